"""NoWag-P (Liu et al. 2025): 2:4 mask chosen in NoWag-normalised coordinates; ARMOR's iteration 0."""
from __future__ import annotations

import torch

from .base import CompressedLayer, LayerStats, MethodOptions, Progress, register_method
from .masks import nowag_normalize, one_shot_result, sanitize_h, two_four_mask


def nowag_mask(wbar: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Top-2 of Wbar_ij^2 h_j per group of 4: the mask that minimises the proxy loss with W' = Wbar."""
    return two_four_mask(wbar.square() * sanitize_h(h).to(wbar.device)[None, :])


@register_method("nowag-p")
def nowag_prune(w: torch.Tensor, stats: LayerStats, opts: MethodOptions,
                progress: Progress | None = None) -> CompressedLayer:
    """S = diag(r) (Wbar * M) diag(c) = W * M: the normalisation only steers the mask choice."""
    w = w.float()
    wbar, _, _ = nowag_normalize(w)
    return one_shot_result(w, w * nowag_mask(wbar, stats.h), stats.h)
