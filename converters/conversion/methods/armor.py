"""ARMOR (arXiv 2510.05528): W ~ diag(r) A (W' * M) B diag(c), A/B block-diagonal, M a 2:4 mask.

This module is the lifecycle: validate, normalise, start from NoWag-P, alternate a continuous step
(opts.solver) with the sparse-core step, stop early, keep the best state, fold diag(r), diag(c)
into the blocks. The steps themselves are in armor_sparsify (mask step, tiles) and armor_exact.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompressedLayer, LayerStats, MethodOptions, Progress, check_positive, option_error, register_method
from .armor_exact import exact_step
from .armor_sparsify import core_gradient, from_tiles, scaled_residual, sparse_core_step, to_tiles
from .masks import nowag_normalize, sanitize_h
from .nowag import nowag_mask

SOLVERS = ("exact", "adam")


@dataclass(frozen=True)
class ArmorOptions(MethodOptions):
    block_size: int = 64
    iters: int = 300                 # 0 keeps the NoWag-P start with identity blocks
    solver: str = "exact"            # "exact" block updates or the reference's "adam" step
    lr: float = 1e-4                 # adam solver
    rtol: float = 1e-6               # early stopping: relative improvement threshold
    patience: int = 100
    groups_per_tile: int = 16        # sparse-core group updates per tile per iteration

    def __post_init__(self):
        check_positive(self, "block_size", multiple_of=4)
        check_positive(self, "patience", "groups_per_tile")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise option_error("iters", self.iters, "a number of iterations >= 0")
        if self.solver not in SOLVERS:
            raise option_error("solver", self.solver, f"one of {', '.join(SOLVERS)}")
        if not self.lr > 0:
            raise option_error("lr", self.lr, "a positive learning rate")
        if not self.rtol >= 0:
            raise option_error("rtol", self.rtol, "a relative tolerance >= 0")


@dataclass(frozen=True)
class Normalised:
    """One linear in the solver's coordinates: W = diag(r) Wbar diag(c) (NoWag), column weights h, and the
    target tiles Wt = Wbar diag(sqrt h), so that the loss is sum ||A_a S_ab Bs_b - Wt_ab||^2 over tiles."""

    wbar: torch.Tensor      # [N, K]
    r: torch.Tensor         # [N]
    c: torch.Tensor         # [K]
    h: torch.Tensor         # [K], sanitised
    sqrt_h: torch.Tensor    # [K/b, b]
    wt: torch.Tensor        # [N/b, K/b, b, b]

    @classmethod
    def of(cls, w: torch.Tensor, h: torch.Tensor, bsz: int) -> "Normalised":
        h = sanitize_h(h).to(w.device)
        wbar, r, c = nowag_normalize(w)
        return cls(wbar, r, c, h, h.sqrt().reshape(-1, bsz), to_tiles(wbar * h.sqrt(), bsz))

    def stored_blocks(self, a: torch.Tensor, bs_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b_in, b_out) as the checkpoint holds them: diag(r) and diag(c) / sqrt(h) folded into A and Bs."""
        bsz = a.shape[-1]
        return bs_ * (self.c.reshape(-1, bsz) / self.sqrt_h)[:, None, :], self.r.reshape(-1, bsz)[:, :, None] * a

    def solver_blocks(self, b_in: torch.Tensor, b_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, Bs) of stored (b_in, b_out): the inverse of :meth:`stored_blocks`."""
        bsz = b_out.shape[-1]
        return b_out / self.r.reshape(-1, bsz)[:, :, None], b_in / (self.c.reshape(-1, bsz) / self.sqrt_h)[:, None, :]


def check_block_size(n: int, k: int, bs: int) -> None:
    """A/B blocks must tile both dimensions and hold whole 2:4 groups."""
    if bs <= 0 or bs % 4 or n % bs or k % bs:
        valid = [d for d in range(4, min(n, k) + 1, 4) if n % d == 0 and k % d == 0]
        raise ValueError(f"block size b={bs} must divide N={n} and K={k} and be a multiple of 4; "
                         f"valid b for this layer: {valid}")


class AdamStep:
    """The reference continuous step: one Adam step jointly on A, B and W' per iteration.

    B is the unscaled block (Bs = B diag(sqrt h)) because Adam is not invariant to that rescaling.
    The objective is mean_ij (What - Wbar)^2 h_j, as in the reference, so its gradients match.
    """

    def __init__(self, a: torch.Tensor, bs_: torch.Tensor, s: torch.Tensor, sqrt_h: torch.Tensor, lr: float):
        self.sqrt_h = sqrt_h[:, None, :]                   # [nb, 1, bs]
        self.a = a.clone().requires_grad_(True)
        self.b = (bs_ / self.sqrt_h).requires_grad_(True)
        self.wp = s.clone().requires_grad_(True)
        self.opt = torch.optim.Adam([self.a, self.b, self.wp], lr=lr)

    def __call__(self, a, bs_, s, m, wt):
        """Signature of exact_step: (A, Bs, S, M, Wt) -> (A, Bs, E, grad), S updated in place."""
        with torch.no_grad():
            self.wp.copy_(s)                               # pick up the sparse step's new values
        self.opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            scaled_residual(self.a, self.wp * m, self.b * self.sqrt_h, wt).square().mean().backward()
        self.opt.step()
        a, bs_ = self.a.detach(), self.b.detach() * self.sqrt_h
        s.copy_(self.wp.detach() * m)
        e = scaled_residual(a, s, bs_, wt)
        return a, bs_, e, core_gradient(a, e, bs_)


@register_method("armor", ArmorOptions)
@torch.no_grad()
def armor_compress(w: torch.Tensor, stats: LayerStats, opts: ArmorOptions,
                   progress: Progress | None = None) -> CompressedLayer:
    """Run ARMOR on one linear W [N,K]; history[0] is the NoWag-P loss, history[i] after iteration i."""
    w = w.detach().float()
    n, k = w.shape
    bsz = opts.block_size
    check_block_size(n, k, bsz)
    groups = min(opts.groups_per_tile, bsz * bsz // 4)     # a tile has b²/4 groups
    gen = torch.Generator(device=w.device).manual_seed(opts.seed)

    p = Normalised.of(w, stats.h, bsz)
    wt = p.wt
    m = to_tiles(nowag_mask(p.wbar, p.h), bsz)
    s = to_tiles(p.wbar, bsz) * m
    a = torch.eye(bsz, device=w.device).repeat(n // bsz, 1, 1)
    bs_ = torch.diag_embed(p.sqrt_h)
    step = exact_step if opts.solver == "exact" else AdamStep(a, bs_, s, p.sqrt_h, opts.lr)

    total = max(float(wt.square().sum(dtype=torch.float64)), 1e-300)   # loss at What = 0

    def sq(e: torch.Tensor) -> float:
        return float(e.square().sum(dtype=torch.float64))

    history = [sq(scaled_residual(a, s, bs_, wt)) / total]
    best = (history[0], a, bs_, s.clone())
    ref, stall, it = history[0], 0, 0
    for it in range(1, opts.iters + 1):
        a, bs_, e, grad = step(a, bs_, s, m, wt)
        loss = (sq(e) + sparse_core_step(a, bs_, s, m, grad, groups, gen)) / total
        history.append(loss)
        if progress is not None:
            progress(it, loss)
        if loss < best[0]:
            best = (loss, a.clone(), bs_.clone(), s.clone())
        if loss < ref * (1 - opts.rtol):
            ref, stall = loss, 0
        else:
            stall += 1
            if stall >= opts.patience:
                break

    loss_end, a, bs_, s = best
    b_in, b_out = p.stored_blocks(a, bs_)
    return CompressedLayer(weight=from_tiles(s).contiguous(), b_in=b_in.contiguous(),
                           b_out=b_out.contiguous(), loss_start=history[0], loss_end=loss_end,
                           iters=it, history=history)
