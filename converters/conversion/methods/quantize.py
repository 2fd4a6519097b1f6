"""Int8 kept values (``--scheme W8A16``): round S per output row, then let B_in and B_out absorb the rounding.

Any method's result can be written this way. S's kept values are rounded to int8 with one symmetric
scale per row (compressed-tensors' "channel" strategy, the format's ``weight_scale``); for methods
with blocks, B_out and B_in are then re-solved in closed form with the rounded S fixed, by the exact
solver's block steps (:func:`~.armor_exact.update_out_blocks`, :func:`~.armor_exact.update_in_blocks`),
which accept a block row or column only where it lowers the loss, so the loss after the re-solve is
never above the loss right after rounding. Pure functions on tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from armor_vllm.format import block_diag_left, block_diag_right, dequantize

from .armor import Normalised
from .armor_exact import update_in_blocks, update_out_blocks
from .armor_sparsify import to_tiles
from .base import CompressedLayer
from .masks import normalized_proxy_loss

QMAX = 127  # symmetric: -128 is never used, so -x is representable for every code x
# B_out then B_in solves after rounding. On SmolLM2-135M's layer 2 (quick preset, b = 64) one round took
# every linear's loss back below its unquantized value; rounds 2-4 gained < 0.1% more (docs/converter.md).
RESOLVE_ROUNDS = 1


@dataclass
class QuantizedCore:
    """S as int8 codes [N, K] (zeros at pruned positions) and one scale per row [N] (fp32, exact in bf16)."""

    codes: torch.Tensor
    scale: torch.Tensor


def quantize_rows(s: torch.Tensor) -> QuantizedCore:
    """Round-to-nearest int8 codes of a dense S, scale = max |kept value| / 127 per row.

    The scale is rounded to a bfloat16 value, which fp32, bf16 and fp16 (above 2^-14) hold exactly,
    so value = scale · code is what every model dtype serves and what the B re-solve sees. An all-zero
    row gets scale 1 (its codes are 0 anyway).
    """
    amax = s.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / QMAX, 1.0).to(torch.bfloat16).float()
    codes = torch.round(s / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return QuantizedCore(codes, scale)


def effective_weight(s: torch.Tensor, b_in: torch.Tensor | None, b_out: torch.Tensor | None) -> torch.Tensor:
    """blockdiag(b_out) · S · blockdiag(b_in) of a method's result (S dense)."""
    return s if b_in is None else block_diag_left(b_out, block_diag_right(s, b_in))


def quantize_layer(w: torch.Tensor, h: torch.Tensor, res: CompressedLayer,
                   rounds: int = RESOLVE_ROUNDS) -> tuple[CompressedLayer, QuantizedCore, float, float]:
    """(result with S dequantized and the blocks re-solved, the int8 core, loss right after rounding, loss
    after the re-solve) for one job's source weight ``w`` [N, K], its column statistics ``h`` and the
    method's result. Losses are the methods' relative proxy loss (:func:`~.masks.normalized_proxy_loss`)."""
    q = quantize_rows(res.weight)
    s = dequantize(q.codes, q.scale)
    loss_rounded = normalized_proxy_loss(w, effective_weight(s, res.b_in, res.b_out), h)
    if res.b_in is None:
        return replace(res, weight=s), q, loss_rounded, loss_rounded
    p = Normalised.of(w, h, res.b_out.shape[-1])
    a, bs_ = p.solver_blocks(res.b_in, res.b_out)
    tiles = to_tiles(s, res.b_out.shape[-1])
    for _ in range(rounds):
        a = update_out_blocks(a, tiles, bs_, p.wt)
        bs_, _ = update_in_blocks(a, tiles, bs_, p.wt)
    b_in, b_out = p.stored_blocks(a, bs_)
    loss = normalized_proxy_loss(w, effective_weight(s, b_in, b_out), h)
    return replace(res, weight=s, b_in=b_in.contiguous(), b_out=b_out.contiguous()), q, loss_rounded, loss
