"""Compression methods: a name -> function registry plus the typed data they all share.

Every method has the signature ``fn(W, stats, cfg, progress=None) -> CompressedLayer`` and returns
a 2:4 sparse core S and optional block-diagonal transforms with W ~ blockdiag(b_out) S blockdiag(b_in),
so the converter and the checkpoint writer treat all methods alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class LayerStats:
    """Calibration statistics of one linear's input x."""

    h: torch.Tensor                  # [K] fp32, mean over tokens of x_j^2
    xtx: Optional[torch.Tensor]      # [K,K] fp32, mean over tokens of x x^T (only when a method needs it)
    ntokens: int


@dataclass
class MethodConfig:
    """One typed config for every method; fields a method doesn't use are ignored."""

    block_size: int = 64
    iters: int = 300
    solver: str = "exact"            # "exact" | "adam"  (armor only)
    lr: float = 1e-4                 # adam solver
    rtol: float = 1e-6               # early stopping: relative improvement threshold
    patience: int = 100
    groups_per_tile: int = 16        # sparse-core group updates per tile per iteration
    dampening: float = 0.01          # sparsegpt
    sparsegpt_blocksize: int = 128
    seed: int = 0


@dataclass
class CompressedLayer:
    """Result of one method on one linear: W ~ blockdiag(b_out) @ weight @ blockdiag(b_in)."""

    weight: torch.Tensor             # [N,K] fp32 dense tensor holding the 2:4 sparse core S
    b_in: Optional[torch.Tensor]     # [K/b,b,b] (None for baselines)
    b_out: Optional[torch.Tensor]    # [N/b,b,b]
    loss_start: float                # relative proxy loss of the initial state (NoWag-P for armor)
    loss_end: float
    iters: int
    history: list[float]             # relative proxy loss per iteration (armor); [] for one-shot methods


Progress = Callable[[int, float], None]
Method = Callable[[torch.Tensor, LayerStats, MethodConfig, Optional[Progress]], CompressedLayer]

METHODS: dict[str, Method] = {}


def register_method(name: str) -> Callable[[Method], Method]:
    """Decorator adding a method to METHODS under ``name`` (names must be unique)."""

    def deco(fn: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = fn
        return fn

    return deco


def get_method(name: str) -> Method:
    """Look a method up by name; the error lists the valid names so a typo is easy to fix."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}") from None


# Imported last so that each module can register itself with the names defined above.
from . import armor, magnitude, nowag, sparsegpt, wanda  # noqa: E402,F401
