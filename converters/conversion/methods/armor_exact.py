"""The "exact" continuous step of ARMOR: block-coordinate exact minimisation instead of one Adam step.

Given the other two factors, the loss is an ordinary least-squares problem in each of A, Bs and the
kept values of S, so each is minimised directly: A and Bs by bs x bs normal equations per block,
S by a few conjugate-gradient steps per tile. Each update is checked against the exact loss change
it causes and is kept only where it lowers the loss, so the step never increases the loss. Same
tile conventions as armor_sparsify (Bs = B diag(sqrt h), Wt = Wbar diag(sqrt h)).
"""
from __future__ import annotations

import torch

from .armor_sparsify import core_gradient, left_mul, right_mul

RIDGE = 1e-6       # relative ridge: lambda = RIDGE * trace(Q) / bs, keeps rank-deficient Q solvable
CG_STEPS = 4       # CG steps on S per iteration: on 1536x576, b=64 it reached a given loss soonest (vs 1-16)


def _ridged_solve(q: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """Solve (Q + lambda I) X = rhs for a batch of small symmetric PSD Q (float64: the Q are tiny)."""
    lam = ridge * q.diagonal(dim1=-2, dim2=-1).mean(-1) + 1e-30
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return torch.linalg.solve(q + lam[:, None, None] * eye, rhs)


def update_out_blocks(a: torch.Tensor, s: torch.Tensor, bs_: torch.Tensor, wt: torch.Tensor,
                      ridge: float = RIDGE) -> torch.Tensor:
    """New A: A_a = (sum_b Wt_ab C_ab^T)(sum_b C_ab C_ab^T + lambda I)^-1 with C = S Bs.

    Each row of A_a only touches its own output row, so rows are accepted independently, where the
    exact loss change dA (2(A Q - P) + dA Q) (summed over the row) is negative.
    """
    c = right_mul(s, bs_)
    q = torch.einsum("abik,abjk->aij", c, c).double()
    p = torch.einsum("abik,abjk->aij", wt, c).double()
    a0 = a.double()
    a1 = _ridged_solve(q, p.transpose(1, 2), ridge).transpose(1, 2)
    d = a1 - a0
    change = (d * (2 * (a0 @ q - p) + d @ q)).sum(-1)
    return torch.where((change < 0)[..., None], a1, a0).float()


def update_in_blocks(a: torch.Tensor, s: torch.Tensor, bs_: torch.Tensor, wt: torch.Tensor,
                     ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """New Bs: Bs_b = (sum_a F_ab^T F_ab + lambda I)^-1 sum_a F_ab^T Wt_ab with F = A S.

    Solving for Bs = B diag(sqrt h) directly is the weighted problem for B, since h only scales
    columns. Columns are accepted independently, like rows of A. Returns (Bs, F) so the caller
    gets the residual F Bs - Wt with one more product.
    """
    f = left_mul(a, s)
    q = torch.einsum("abki,abkj->bij", f, f).double()
    p = torch.einsum("abki,abkj->bij", f, wt).double()
    b0 = bs_.double()
    b1 = _ridged_solve(q, p, ridge)
    d = b1 - b0
    change = (d * (2 * (q @ b0 - p) + q @ d)).sum(-2)
    return torch.where((change < 0)[:, None, :], b1, b0).float(), f


def refine_core_values(a: torch.Tensor, bs_: torch.Tensor, s: torch.Tensor, m: torch.Tensor,
                       e: torch.Tensor, grad: torch.Tensor, steps: int = CG_STEPS) -> None:
    """Conjugate gradients on the kept values of S, per tile, in place on s, e and grad.

    Each tile is its own quadratic with Hessian action H p = 2 A^T A p Bs Bs^T, so step sizes are
    per tile: alpha = <r,p> / <p,Hp> is the exact minimiser along p (the loss is quadratic along a
    line), hence every step is non-increasing. Using the small Gram blocks A^T A and Bs Bs^T costs
    2 tile products per step (H p also updates the gradient); e gets the total change at the end.
    """
    ata = a.transpose(-1, -2) @ a
    bbt = bs_ @ bs_.transpose(-1, -2)
    ds = torch.zeros_like(s)
    r = (grad * m).neg_()
    p = r.clone()
    rr = r.square().sum((-1, -2))
    for step in range(steps):
        hp = right_mul(left_mul(ata, p), bbt).mul_(2.0)
        curv = (p * hp).sum((-1, -2))
        rp = (r * p).sum((-1, -2))
        alpha = torch.where(curv > 0, rp / curv.clamp_min(torch.finfo(curv.dtype).tiny), 0.0).clamp_min(0.0)
        alpha = alpha[..., None, None]
        ds.addcmul_(alpha, p)
        grad.addcmul_(alpha, hp)
        if step + 1 < steps:
            r = (grad * m).neg_()
            rr_new = r.square().sum((-1, -2))
            beta = torch.where(rr > 0, rr_new / rr.clamp_min(torch.finfo(rr.dtype).tiny), 0.0)
            p = p.mul_(beta[..., None, None]).add_(r)
            rr = rr_new
    s.add_(ds)
    e.add_(right_mul(left_mul(a, ds), bs_))


def exact_step(a: torch.Tensor, bs_: torch.Tensor, s: torch.Tensor, m: torch.Tensor,
               wt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One continuous step: exact A, then exact Bs, then CG on S (in place). Returns (A, Bs, E, grad)."""
    a = update_out_blocks(a, s, bs_, wt)
    bs_, f = update_in_blocks(a, s, bs_, wt)
    e = right_mul(f, bs_) - wt
    grad = core_gradient(a, e, bs_)
    refine_core_values(a, bs_, s, m, e, grad)
    return a, bs_, e, grad
