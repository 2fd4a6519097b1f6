"""The dense fold: W_eff = blockdiag(B_out) · S · blockdiag(B_in) per rank, then a plain GEMM.

Without hardware 2:4 support (CPUs, pre-Ampere GPUs, fp32) the fastest way to apply an ARMOR
layer is to multiply the factors out once at load time and hand the result to vLLM's own
unquantized GEMM path (oneDNN/AMX prepacking on CPU), so it runs exactly at dense speed.
"""
from __future__ import annotations

import torch

from armor_vllm.format import block_diag_left, block_diag_right


def fold_weight(s: torch.Tensor, b_in: torch.Tensor | None, b_out: torch.Tensor | None,
                shard_sizes: list[int]) -> torch.Tensor:
    """W_eff [N, K] in fp32; rows of fused shard i use input transform b_in[i] (or b_in[0])."""
    w = s.float()
    if b_in is not None:
        b_in = b_in.float()
        w = torch.cat([block_diag_right(rows, b_in[min(i, len(b_in) - 1)])
                       for i, rows in enumerate(w.split(shard_sizes))])
    if b_out is not None:
        w = block_diag_left(b_out.float(), w)
    return w


def prepare(layer: torch.nn.Module, s, b_in, b_out, shard_sizes: list[int]):
    """Set ``layer.weight`` to the folded weight and return vLLM's unquantized ``apply``."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    w = fold_weight(s, b_in, b_out, shard_sizes).to(s.dtype)
    layer.weight = torch.nn.Parameter(w, requires_grad=False)
    dense = UnquantizedLinearMethod()
    dense.process_weights_after_loading(layer)
    return dense.apply
