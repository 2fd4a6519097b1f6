"""Magnitude 2:4 pruning: the data-free baseline (keep the 2 largest |W_ij| of every 4)."""
from __future__ import annotations

import torch

from .base import CompressedLayer, LayerStats, MethodOptions, Progress, register_method
from .masks import one_shot_result, two_four_mask


@register_method("magnitude")
def magnitude_prune(w: torch.Tensor, stats: LayerStats, opts: MethodOptions,
                    progress: Progress | None = None) -> CompressedLayer:
    """Keep the top-2 |W_ij| per group of 4 along K; kept values are unchanged."""
    w = w.float()
    return one_shot_result(w, w * two_four_mask(w.abs()), stats.h)
