"""Wanda 2:4 pruning (Sun et al. 2023): score |W_ij| * ||X_j||, no weight update."""
from __future__ import annotations

import torch

from .base import CompressedLayer, LayerStats, MethodOptions, Progress, register_method
from .masks import one_shot_result, sanitize_h, two_four_mask


@register_method("wanda", calibration="sequential")  # measured: docs/results.md, calibration order
def wanda_prune(w: torch.Tensor, stats: LayerStats, opts: MethodOptions,
                progress: Progress | None = None) -> CompressedLayer:
    """Keep the top-2 of |W_ij| sqrt(h_j) per group of 4 (sqrt(h_j) is ||X_j|| up to a constant)."""
    w = w.float()
    score = w.abs() * sanitize_h(stats.h).to(w.device).sqrt()[None, :]
    return one_shot_result(w, w * two_four_mask(score), stats.h)
