"""Config plumbing shared by train.py, eval.py and the tests: resolvers and small helpers."""
from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from vtc import ROOT

CONF_DIR = ROOT / "conf"


def compose_conf(name: str, overrides=(), hydra_config: bool = False) -> DictConfig:
    """``name`` (train / eval) composed from vtc's conf directory outside a running Hydra app."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=hydra_config)


SWEEP_MARKS = (",", "range(", "choice(", "interval(", "glob(")


def _run_name() -> str:
    """A run's name from its Hydra overrides: in a sweep only the swept keys
    (``compressor=pool``), otherwise every override but paths (``compressor=pool,seed=1``)."""
    import sys

    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        job = [o for o in hc.overrides.task if not o.lstrip("+~").startswith(("paths.", "hydra."))]
        if hc.mode == RunMode.MULTIRUN:
            swept = {a.split("=", 1)[0].lstrip("+~") for a in sys.argv[1:]
                     if "=" in a and any(m in a.split("=", 1)[1] for m in SWEEP_MARKS)}
            # Keys an experiment sweeps from its yaml (hydra.sweeper.params, e.g. a study's arms).
            swept |= {str(k) for k in (hc.sweeper.get("params") or {})}
            if swept:
                job = [o for o in job if o.split("=", 1)[0].lstrip("+~") in swept]
        name = ",".join(job)
    except Exception:
        name = ""
    return name[:250] or "default"


def world_size_from(devices, num_nodes) -> int:
    """``devices * num_nodes`` for the data-parallel mesh; ``devices: auto`` (or -1) reads the
    launcher: WORLD_SIZE (torchrun), SLURM_NTASKS (srun), else the visible GPUs times nodes."""
    nodes = int(num_nodes)
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()]) * nodes
    if str(devices) not in ("auto", "-1"):
        return int(devices) * nodes
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    import torch

    return max(torch.cuda.device_count(), 1) * nodes


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("vtc_root"):
        OmegaConf.register_new_resolver("vtc_root", lambda: os.environ.get("VTC_ROOT", str(ROOT)))
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", _run_name)
    if not OmegaConf.has_resolver("basename"):
        OmegaConf.register_new_resolver("basename", lambda p: os.path.basename(str(p).rstrip("/")))
    if not OmegaConf.has_resolver("vtc_world_size"):
        OmegaConf.register_new_resolver("vtc_world_size", world_size_from)


register_resolvers()


def node_kwargs(node: DictConfig, drop: tuple[str, ...] = ()) -> dict:
    """A config node as plain kwargs for ``hydra.utils.instantiate``, minus keys it must not see."""
    d = OmegaConf.to_container(node, resolve=True)
    for k in drop:
        d.pop(k, None)
    return d


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists kept as their string form (MLflow params)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
