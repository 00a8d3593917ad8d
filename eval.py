"""Evaluate a trained checkpoint, optionally with a test-time compressor.

    python eval.py ckpt_path=outputs/runs/<run>/checkpoints/last.ckpt
    python eval.py -m ckpt_path=... compressor=pool compressor.stride=1,2,4,8
"""
import hydra

import vtc.config  # noqa: F401  (registers the config resolvers)
from vtc.errors import exit_on_config_error


@hydra.main(config_path="conf", config_name="eval", version_base="1.3")
@exit_on_config_error
def main(cfg):
    from vtc.eval.task import evaluate

    return evaluate(cfg)


if __name__ == "__main__":
    main()
