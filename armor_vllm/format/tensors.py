"""Tensor math shared by both halves: 2:4 packing (compressed-tensors' bitmask) and block-diagonal products.

Pure functions on tensors; the kernels and the converter call them, nothing here touches files.
The bitmask is compressed-tensors' (``pack_bitmasks``: little-endian bits along the last dimension),
packed here in torch on the tensor's own device: no round trip through the CPU and numpy per layer, and
no compressed-tensors import (it imports transformers) where the format is only read.
"""
from __future__ import annotations

import torch

from .schema import ArmorFormatError


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool [..., C] -> uint8 [..., ceil(C/8)]: bit j of byte i is column 8i+j (compressed-tensors' pack_bitmasks)."""
    c = mask.shape[-1]
    cols = torch.nn.functional.pad(mask.view(torch.uint8), (0, -c % 8)).unflatten(-1, (-1, 8))
    packed = cols[..., 0].clone()
    for j in range(1, 8):
        packed |= cols[..., j] << j
    return packed


def pack_24(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, K] + 2:4 bool mask -> (values [N, K/2] in row order, bitmask uint8 [N, K/8])."""
    n, k = weight.shape
    values = weight[mask].reshape(n, k // 2)
    return values.contiguous(), pack_bits(mask)


def mask_24(weight: torch.Tensor) -> torch.Tensor:
    """The 2:4 mask of a dense tensor that holds a 2:4 core (zeros at pruned positions).

    A kept weight may be exactly zero, so groups with fewer than 2 nonzeros are completed with
    their first zero positions; a group with more than 2 nonzeros is not 2:4 and is rejected.
    """
    n, k = weight.shape
    nz = (weight != 0).reshape(n, k // 4, 4)
    if (nz.sum(-1) > 2).any():
        r, g = (nz.sum(-1) > 2).nonzero()[0].tolist()
        raise ArmorFormatError(f"weight row {r}, columns {4 * g}..{4 * g + 3}: more than 2 nonzeros, not 2:4")
    # rank positions: nonzeros first, then zeros, by index; keep the first two (in row blocks: the
    # argsort indices are int64, 8 bytes per weight)
    nz = nz.reshape(-1, 4)
    mask = torch.zeros_like(nz)
    pos = torch.arange(4, dtype=torch.int8, device=weight.device)
    for i in range(0, len(nz), 1 << 20):
        order = torch.argsort((~nz[i:i + (1 << 20)]).to(torch.int8) * 4 + pos, dim=-1)
        mask[i:i + (1 << 20)].scatter_(-1, order[:, :2], True)
    return mask.reshape(n, k)


def unpack_mask(bitmask: torch.Tensor, k: int) -> torch.Tensor:
    """Bitmask uint8 [..., ceil(K/8)] (little-endian bits) -> bool [..., K] (compressed-tensors' unpack_bitmasks)."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=bitmask.device)) & 1
    return bits.bool().flatten(-2)[..., :k]


def unpack_24(values: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """(values [N, K/2], bitmask [N, K/8]) -> the dense sparse core S [N, K]."""
    n, k = values.shape[0], bitmask.shape[1] * 8
    mask = unpack_mask(bitmask, k)
    dense = torch.zeros(n, k, dtype=values.dtype, device=values.device)
    dense[mask] = values.reshape(-1)
    return dense


def block_diag_left(blocks: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """blockdiag(blocks) @ m for blocks [n/b, b, b] and m [n, k], without forming n×n."""
    nb, b, _ = blocks.shape
    return torch.bmm(blocks, m.reshape(nb, b, -1)).reshape(m.shape)


def block_diag_right(m: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """m @ blockdiag(blocks) for m [n, k] and blocks [k/b, b, b]."""
    kb, b, _ = blocks.shape
    return torch.einsum("nkb,kbc->nkc", m.reshape(m.shape[0], kb, b), blocks).reshape(m.shape)


def dequantize(values: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kept values as numbers: ``scale[i] · values[i, j]`` for int8 values and a per-row scale ([N, 1] or [N];
    compressed-tensors' symmetric channel strategy, no zero point), computed in fp32; unquantized values
    (``scale`` None) are only cast. The one definition every reader and reference uses."""
    if scale is None:
        return values.to(dtype)
    return (values.to(torch.float32) * scale.to(torch.float32).reshape(-1, 1)).to(dtype)


def reconstruct(values, bitmask, b_in=None, b_out=None, scale=None) -> torch.Tensor:
    """The dense weight W = blockdiag(b_out) · S · blockdiag(b_in) that a layer represents, in the model dtype
    (``scale``'s for int8 values, which are dequantized in fp32 first)."""
    if scale is not None:
        values = dequantize(values, scale, scale.dtype)
    w = unpack_24(values, bitmask)
    if b_in is not None:
        w = block_diag_right(w, b_in.to(w.dtype))
    if b_out is not None:
        w = block_diag_left(b_out.to(w.dtype), w)
    return w
