"""SparseGPT 2:4 (Frantar & Alistarh 2023): OBS pruning column by column with weight updates.

Uses the full input Gram matrix H = E[x x^T]; the remaining columns absorb each pruned weight's
error through H^-1, which is why it beats the update-free baselines.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import (CompressedLayer, LayerStats, MethodOptions, Progress, check_positive, option_error,
                   register_method)
from .masks import one_shot_result, two_four_mask


def inverse_hessian_factor(xtx: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + damp I)^-1 (row i of U is OBS's update row once columns < i are fixed).

    Dead inputs (H_jj = 0) get H_jj = 1 so H stays invertible; returns (U, dead mask).
    """
    h = xtx.detach().float().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    h.diagonal().add_(dampening * h.diagonal().mean())
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(hinv, upper=True), dead
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"sparsegpt: H + damp*I is not positive definite (dampening={dampening}); "
                         "increase dampening") from err


def sparsegpt_2_4(w: torch.Tensor, xtx: torch.Tensor, dampening: float, blocksize: int) -> torch.Tensor:
    """2:4-prune W [N,K] with OBS updates, lazily batched over ``blocksize`` columns.

    At the first column of each group of 4 the 2 kept columns maximise w^2 / [H^-1]_jj (OBS saliency
    with the columns to the left already fixed); the pruned weights' errors are pushed right.
    """
    n, k = w.shape
    if k % 4 or blocksize <= 0 or blocksize % 4:
        raise ValueError(f"sparsegpt needs K ({k}) and sparsegpt_blocksize ({blocksize}) to be multiples of 4")
    u, dead = inverse_hessian_factor(xtx, dampening)
    w = w.detach().float().clone()
    w[:, dead] = 0.0
    out = torch.zeros_like(w)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        errs = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if i % 4 == 0:
                keep = two_four_mask(w1[:, i:i + 4].square() / u1.diagonal()[i:i + 4].square())
            q = w1[:, i] * keep[:, i % 4]
            errs[:, i] = (w1[:, i] - q) / u1[i, i]
            w1[:, i:] -= errs[:, i:i + 1] * u1[i:i + 1, i:]
            out[:, i1 + i] = q
        w[:, i2:] -= errs @ u[i1:i2, i2:]
    return out


@dataclass(frozen=True)
class SparseGPTOptions(MethodOptions):
    dampening: float = 0.01          # added to diag(H) as a fraction of its mean
    blocksize: int = 128             # columns per lazy OBS update batch

    def __post_init__(self):
        if not self.dampening > 0:
            raise option_error("dampening", self.dampening, "a positive fraction of mean(diag H)")
        check_positive(self, "blocksize", multiple_of=4)


# sequential: measured better here (docs/results.md, dense vs sequential calibration), as in the reference
@register_method("sparsegpt", SparseGPTOptions, needs_xtx=True, calibration="sequential")
def sparsegpt_prune(w: torch.Tensor, stats: LayerStats, opts: SparseGPTOptions,
                    progress: Progress | None = None) -> CompressedLayer:
    """SparseGPT with dampening opts.dampening * mean(diag H); needs stats.xtx."""
    if stats.xtx is None:
        raise ValueError("sparsegpt needs the input Gram matrix: LayerStats.xtx is None "
                         "(collect calibration statistics with xtx for this method)")
    weight = sparsegpt_2_4(w, stats.xtx.to(w.device), opts.dampening, opts.blocksize)
    return one_shot_result(w, weight, stats.h)
