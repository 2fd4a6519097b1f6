"""ARMOR's tile algebra and its sparse-core (mask) step, as pure functions on tensors.

Because A and B are block-diagonal, the loss splits into independent bs x bs tiles
(a, b): ||A_a S_ab Bs_b - Wt_ab||_F^2, where Bs = B diag(sqrt h) and Wt = Wbar diag(sqrt h)
fold the column weights h into plain Frobenius norms. Everything here is batched over all
tiles at once: tensors are [na, nb, bs, bs] (S, M, residual E, gradient G), A is [na, bs, bs]
and Bs is [nb, bs, bs]. No N x N or K x K matrix is ever formed.
"""
from __future__ import annotations

import itertools

import torch

# The 6 two-of-four supports, as index pairs and as a [6, 4] bool table.
_PAIRS = list(itertools.combinations(range(4), 2))
_P = torch.tensor([p for p, _ in _PAIRS])
_Q = torch.tensor([q for _, q in _PAIRS])
_SUPPORTS = torch.zeros(6, 4, dtype=torch.bool)
_SUPPORTS[torch.arange(6), _P] = True
_SUPPORTS[torch.arange(6), _Q] = True
# Relative ridge on each 2x2 Gram: keeps near-collinear rows of Bs solvable. Whether a candidate
# is taken is decided on its exact (unridged) loss, so the ridge can never make the loss rise.
_PAIR_RIDGE = 1e-6


def to_tiles(x: torch.Tensor, bs: int) -> torch.Tensor:
    """[N, K] -> [N/bs, K/bs, bs, bs] (contiguous copy)."""
    n, k = x.shape
    return x.reshape(n // bs, bs, k // bs, bs).permute(0, 2, 1, 3).contiguous()


def from_tiles(t: torch.Tensor) -> torch.Tensor:
    """[na, nb, bs, bs] -> [na*bs, nb*bs]."""
    na, nb, bs, _ = t.shape
    return t.permute(0, 2, 1, 3).reshape(na * bs, nb * bs)


def left_mul(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A_a X_ab for every tile (einsum: a broadcast matmul would copy A once per tile, ~2x slower)."""
    return torch.einsum("aij,abjk->abik", a, x)


def right_mul(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """X_ab B_b for every tile."""
    return torch.einsum("abij,bjk->abik", x, b)


def scaled_residual(a: torch.Tensor, s: torch.Tensor, bs_: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """E = A S Bs - Wt per tile; the loss is ||E||^2."""
    return right_mul(left_mul(a, s), bs_) - wt


def core_gradient(a: torch.Tensor, e: torch.Tensor, bs_: torch.Tensor) -> torch.Tensor:
    """dL/dS = 2 A^T E Bs^T per tile, at pruned positions too (it drives the group sampling)."""
    return 2.0 * right_mul(left_mul(a.transpose(-1, -2), e), bs_.transpose(-1, -2))


def sample_groups(grad: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Draw k groups per tile with probability proportional to the gradient's L1 norm on the group.

    Returns [na*nb, k] group indices i*(bs/4) + g/4 (row i, columns g..g+3 of the tile). Inverse-CDF
    sampling, k draws with replacement at the cost of one: torch.multinomial was ~25x slower here
    (~10 ms per call at 1536x576, b=64) and drawing without replacement costs a pass per draw. A
    group drawn twice is simply solved again, which cannot raise the loss. A tile whose gradient is
    exactly zero samples uniformly.
    """
    na, nb, bs, _ = grad.shape
    score = grad.abs().reshape(na * nb, bs * bs // 4, 4).sum(-1)
    score = torch.where(score.sum(-1, keepdim=True) > 0, score, 1.0)
    cdf = score.cumsum(-1)
    u = torch.rand(cdf.shape[0], k, generator=gen, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(cdf.shape[1] - 1)


def best_two_of_four(gram: torch.Tensor, u: torch.Tensor, anorm2: torch.Tensor, s_old: torch.Tensor,
                     m_old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact best 2:4 support and values for one group per tile (batched over the leading dim).

    With R the tile residual with the group zeroed, a the group row's column of A and Bg the
    group's 4 rows of Bs, putting values s on the group changes the loss by
    f(s) = 2 s.u + |a|^2 s^T gram s, where u = Bg R^T a and gram = Bg Bg^T. Each support P is a
    2-variable least squares: s_P = -gram_PP^-1 u_P / |a|^2. Returns (values [T,4], mask [T,4],
    loss change [T]); a group keeps its current values and mask bits (s_old, m_old) unless the
    best support strictly lowers f.
    """
    p, q = _P.to(u.device), _Q.to(u.device)
    m00, m11, m01 = gram[:, p, p], gram[:, q, q], gram[:, p, q]
    up, uq = u[:, p], u[:, q]
    ridge = _PAIR_RIDGE * 0.5 * (m00 + m11) + torch.finfo(u.dtype).tiny
    det = ((m00 + ridge) * (m11 + ridge) - m01 * m01).clamp_min(torch.finfo(u.dtype).tiny)
    scale = anorm2.clamp_min(torch.finfo(u.dtype).tiny)[:, None] * det
    sp = -((m11 + ridge) * up - m01 * uq) / scale
    sq = -((m00 + ridge) * uq - m01 * up) / scale
    f = 2 * (sp * up + sq * uq) + anorm2[:, None] * (m00 * sp * sp + 2 * m01 * sp * sq + m11 * sq * sq)
    f = torch.where(torch.isfinite(f), f, torch.full_like(f, float("inf")))
    f_old = 2 * (s_old * u).sum(-1) + anorm2 * (s_old[:, None, :] @ gram @ s_old[:, :, None]).reshape(-1)
    f_best, best = f.min(-1)
    take = f_best < f_old
    rows = torch.arange(u.shape[0], device=u.device)
    vals = torch.zeros_like(s_old)
    vals[rows, p[best]] = sp[rows, best]
    vals[rows, q[best]] = sq[rows, best]
    return (torch.where(take[:, None], vals, s_old),
            torch.where(take[:, None], _SUPPORTS.to(u.device)[best], m_old),
            torch.where(take, f_best - f_old, 0.0))


def solve_groups(a: torch.Tensor, bs_: torch.Tensor, s: torch.Tensor, m: torch.Tensor,
                 grad: torch.Tensor, idx: torch.Tensor) -> float:
    """Solve groups idx[:, 0], idx[:, 1], ... of every tile in turn, in place on S and M.

    Returns the total loss change. Tiles are independent, so each turn solves one group in all
    tiles at once. A group only needs its 4 gradient entries and the Gram blocks A^T A, Bs Bs^T:
    changing group j by d moves the half-gradient of a later group l by
    (A^T A)[i_l, i_j] (Bs Bs^T)[g_l, g_j] d, so a turn costs O(k) per tile instead of a pass over
    the bs x bs residual, and many groups per tile are cheap. ``grad`` must be dL/dS at entry.
    """
    na, nb, bsz, _ = s.shape
    ng, k = bsz // 4, idx.shape[1]
    t = torch.arange(na * nb, device=s.device)
    ta, tb = (t // nb)[:, None], (t % nb)[:, None]
    row, grp = idx // ng, idx % ng                                          # [T, k]
    ata = a.transpose(-1, -2) @ a                                           # [na, bs, bs]
    bbt = (bs_ @ bs_.transpose(-1, -2)).reshape(nb, ng, 4, ng, 4).permute(0, 1, 3, 2, 4)
    sv = s.view(na * nb, bsz, ng, 4)
    mv = m.view(na * nb, bsz, ng, 4)
    half_grad = 0.5 * grad.reshape(na * nb, bsz, ng, 4)[t[:, None], row, grp]   # [T, k, 4]
    change = torch.zeros((), dtype=torch.float64, device=s.device)
    for j in range(k):
        rj, gj = row[:, j:j + 1], grp[:, j:j + 1]
        s_old = sv[t, rj[:, 0], gj[:, 0]]
        gram = bbt[tb, gj, gj][:, 0]
        anorm2 = ata[ta, rj, rj][:, 0]
        u = half_grad[:, j] - anorm2[:, None] * (gram @ s_old[:, :, None]).squeeze(-1)
        new_vals, new_mask, df = best_two_of_four(gram, u, anorm2, s_old, mv[t, rj[:, 0], gj[:, 0]])
        sv[t, rj[:, 0], gj[:, 0]] = new_vals
        mv[t, rj[:, 0], gj[:, 0]] = new_mask
        change += df.sum(dtype=torch.float64)
        if j + 1 < k:
            rl, gl = row[:, j + 1:], grp[:, j + 1:]
            couple = ata[ta, rl, rj][..., None, None] * bbt[tb, gl, gj]     # [T, k-j-1, 4, 4]
            half_grad[:, j + 1:] += (couple @ (new_vals - s_old)[:, None, :, None]).squeeze(-1)
    return float(change)


def sparse_core_step(a: torch.Tensor, bs_: torch.Tensor, s: torch.Tensor, m: torch.Tensor,
                     grad: torch.Tensor, groups_per_tile: int, gen: torch.Generator) -> float:
    """One sparse-core step in place on S and M; returns the loss change (never positive).

    Groups are drawn by gradient, then solved one after another, since groups of one tile interact;
    each solve is the exact minimiser given the rest, so the loss never increases.
    """
    return solve_groups(a, bs_, s, m, grad, sample_groups(grad, groups_per_tile, gen))
