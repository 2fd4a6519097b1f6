"""The unfolded reference: y = ((x · B_inᵀ) · Sᵀ) · B_outᵀ, each block-diagonal factor a ``bmm``.

S is kept dense (zeros included), so this is never faster than the fold; it exists to prove
that the factorised computation equals the folded one, and it is what the sparse backend
runs with a sparse S.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def block_apply(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """x · blockdiag(blocks)ᵀ over the last dimension: x [..., nb·b], blocks [nb, b, b]."""
    nb, b, _ = blocks.shape
    xb = x.reshape(-1, nb, b).transpose(0, 1)  # [nb, T, b]
    return torch.bmm(xb, blocks.transpose(1, 2)).transpose(0, 1).reshape(x.shape)


def per_shard_linear(x: torch.Tensor, b_in: torch.Tensor | None, shard_sizes: list[int], linear) -> torch.Tensor:
    """B_in then ``linear(x_s, shard_index)`` per output shard, concatenated.

    b_in [n_slots, K/b, b, b] holds one input transform per fused shard (q/k/v, gate/up);
    with a single slot every shard shares it and one GEMM (shard index -1) covers all rows.
    """
    if b_in is None or b_in.shape[0] == 1:
        return linear(x if b_in is None else block_apply(x, b_in[0]), -1)
    return torch.cat([linear(block_apply(x, b_in[i]), i) for i in range(len(shard_sizes))], dim=-1)


def sandwich_linear(x, s, b_in, b_out, bias, shard_sizes: list[int]) -> torch.Tensor:
    """x Wᵀ + bias for W = blockdiag(b_out) · S · blockdiag(b_in[shard]), S dense [N, K]."""
    rows = s.split(shard_sizes)
    y = per_shard_linear(x, b_in, shard_sizes, lambda xs, i: F.linear(xs, s if i < 0 else rows[i]))
    if b_out is not None:
        y = block_apply(y, b_out)
    return y if bias is None else y + bias


def prepare(layer: torch.nn.Module, s, b_in, b_out, shard_sizes: list[int]):
    """Keep S dense in ``layer.weight`` and the factors beside it; return the ``apply``."""
    set_params(layer, weight=s, b_in=b_in, b_out=b_out)

    def apply(layer, x, bias=None):
        return torch.ops.armor.sandwich(x, layer.weight, layer.b_in, layer.b_out, bias, shard_sizes)

    return apply


def set_params(layer: torch.nn.Module, **tensors) -> None:
    """Register plain frozen parameters (or None) on a layer after loading."""
    for name, t in tensors.items():
        layer.register_parameter(name, None if t is None else torch.nn.Parameter(t, requires_grad=False))
