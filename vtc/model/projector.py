"""Vision-to-language projectors (LLaVA's ``mm_projector_type``)."""
from __future__ import annotations

import re

from torch import nn

from vtc.errors import ConfigError


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """``linear`` (LLaVA-1) or ``mlp{N}x_gelu`` (LLaVA-1.5 uses mlp2x_gelu: in -> out -> out)."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "identity":
        if in_dim != out_dim:
            raise ConfigError("projector.kind", f"identity needs equal widths, got {in_dim} -> {out_dim}")
        return nn.Identity()
    m = re.fullmatch(r"mlp(\d+)x_gelu", kind)
    if m is None:
        raise ConfigError("projector.kind", f"unknown projector {kind!r}; use linear or mlp2x_gelu")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(m.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
