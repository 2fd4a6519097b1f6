"""Small helpers shared by every method: the 2:4 mask, NoWag normalisation, the proxy loss.

They live in one place so that all methods select masks and measure loss identically, which is
what makes their reported losses comparable.
"""
from __future__ import annotations

import torch

from .base import CompressedLayer

NORM_EPS = 1e-5
GROUPS_PER_CHUNK = 1 << 20  # 4M weights per step of the mask and loss computations


def sanitize_h(h: torch.Tensor) -> torch.Tensor:
    """Return h with non-finite or <= 0 entries replaced by the mean of the valid ones.

    A column that never fires (h_j = 0) or overflowed would otherwise give NaN scores or a
    loss that ignores it; an all-invalid h falls back to ones (unweighted loss).
    """
    h = h.detach().to(torch.float32)
    valid = torch.isfinite(h) & (h > 0)
    if not bool(valid.any()):
        return torch.ones_like(h)
    return torch.where(valid, h, h[valid].mean())


def two_four_mask(scores: torch.Tensor) -> torch.Tensor:
    """Bool mask keeping the 2 highest scores of every 4 consecutive entries along the last dim.

    A stable descending sort makes ties deterministic (the lower index wins), so a group of equal
    scores, e.g. four exact zeros, still keeps exactly 2 positions. NaN scores rank lowest.
    """
    *lead, k = scores.shape
    if k % 4:
        raise ValueError(f"2:4 sparsity needs the input dimension to be a multiple of 4, got {k}")
    groups = scores.detach().reshape(-1, 4)
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    for i in range(0, len(groups), GROUPS_PER_CHUNK):  # bounded temporaries (sort indices are int64)
        g = torch.nan_to_num(groups[i:i + GROUPS_PER_CHUNK].float(), nan=-float("inf"))
        mask[i:i + GROUPS_PER_CHUNK].scatter_(-1, torch.sort(g, dim=-1, descending=True, stable=True).indices[:, :2], True)
    return mask.reshape(scores.shape)


def nowag_normalize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NoWag normalisation: W = diag(r) Wbar diag(c), columns first, then rows (eps 1e-5).

    Returns (Wbar, r, c). Normalising removes the row/column scale outliers that would otherwise
    dominate the 2:4 selection and the proxy loss.
    """
    w = w.float()
    c = torch.linalg.vector_norm(w, dim=0) + NORM_EPS
    r = torch.linalg.vector_norm(w / c, dim=1) + NORM_EPS
    return w / r[:, None] / c[None, :], r, c


def block_diag_expand(blocks: torch.Tensor) -> torch.Tensor:
    """Dense block-diagonal matrix from stacked blocks [n, b, b] (for tests and reconstruction)."""
    return torch.block_diag(*blocks.unbind(0))


def proxy_loss(wbar: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """ARMOR's proxy loss sum_ij (Wbar - What)_ij^2 h_j, relative to its value at What = 0.

    1.0 means "no better than the zero matrix". Both matrices are in normalised coordinates.
    """
    h = sanitize_h(h).to(wbar.device).double()
    rows = max(1, 4 * GROUPS_PER_CHUNK // max(1, wbar.shape[-1]))  # row blocks: the fp64 copies stay small
    num = den = 0.0
    for a, b in zip(wbar.split(rows), w_hat.split(rows)):
        a = a.double()
        num += float(((a - b.double()).square() * h).sum())
        den += float((a.square() * h).sum())
    return num / den if den > 0 else 0.0


def normalized_proxy_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Proxy loss of a reconstruction What of W, measured in W's NoWag-normalised coordinates.

    This is how one-shot baselines report a loss on the same scale as ARMOR's.
    """
    wbar, r, c = nowag_normalize(w)
    return proxy_loss(wbar, w_hat.float() / r[:, None] / c[None, :], h)


def one_shot_result(w: torch.Tensor, weight: torch.Tensor, h: torch.Tensor):
    """CompressedLayer of a one-shot baseline, with its loss on ARMOR's normalised scale."""
    loss = normalized_proxy_loss(w, weight, h)
    return CompressedLayer(weight=weight.float().contiguous(), b_in=None, b_out=None,
                           loss_start=loss, loss_end=loss, iters=0, history=[])
