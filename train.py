"""Train an LMM with compressed visual tokens: ``python train.py [group=option ...]``.

Examples:
    python train.py                                  # tiny model, synthetic data, CPU, MLflow
    python train.py compressor=pool compressor.stride=4
    python train.py -m compressor=none,pool          # one MLflow child run per job
"""
import hydra

import vtc.config  # noqa: F401  (registers the config resolvers)
from vtc.errors import exit_on_config_error


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@exit_on_config_error
def main(cfg):
    from vtc.train.task import train

    return train(cfg)


if __name__ == "__main__":
    main()
