"""CUDA 2:4 backend: S as a PyTorch semi-structured sparse matrix (cuSPARSELt, else CUTLASS).

B_in and B_out stay batched ``bmm``s over [T, K/b, b]. A fused layer whose shards have
different B_in runs one sparse GEMM per shard. Only the plain tensors of the compressed S
(``packed``, ``meta``) are stored on the layer: the sparse tensor subclass is rebuilt inside
the ``armor::semi_structured`` custom op, so torch.compile and CUDA graphs see one opaque op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

from armor_vllm.kernels.sandwich import block_apply, per_shard_linear, set_params


def available(device: torch.device) -> bool:
    """Hardware 2:4 sparse tensor cores (sm80+): the backend can be asked for explicitly."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def unsupported(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why ``auto`` must not choose this backend here, or None.

    PyTorch's CUTLASS 2:4 kernels are built for sm8x only: on sm90+ without cuSPARSELt the layer
    loads and the first forward fails.
    """
    if not available(device):
        return f"no CUDA GPU with 2:4 sparse tensor cores (sm80+) on {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"2:4 sparse GEMMs need fp16/bf16, the model runs in {dtype}"
    cc = torch.cuda.get_device_capability(device)
    if cc >= (9, 0) and not torch.backends.cusparselt.is_available():
        return f"sm{cc[0]}{cc[1]} without cuSPARSELt (PyTorch's CUTLASS 2:4 kernels are sm8x-only)"
    return None


def _sparse_cls(cutlass: bool):
    return SparseSemiStructuredTensorCUTLASS if cutlass else SparseSemiStructuredTensorCUSPARSELT


def misfit(s: torch.Tensor, shard_sizes: list[int], per_shard: bool) -> str | None:
    """Why S (or one of its shards) cannot be compressed for the chosen backend, or None."""
    cls = _sparse_cls(not torch.backends.cusparselt.is_available())
    limits = cls._DTYPE_SHAPE_CONSTRAINTS.get(s.dtype)
    if limits is None:
        return f"{cls.BACKEND} has no {s.dtype} kernel"
    for rows in shard_sizes if per_shard else [s.shape[0]]:
        if rows % limits.sparse_min_rows or s.shape[1] % limits.sparse_min_cols:
            return (f"{cls.BACKEND} {s.dtype} needs rows % {limits.sparse_min_rows} and "
                    f"K % {limits.sparse_min_cols} == 0, got [{rows}, {s.shape[1]}]")
    return None


def prepare(layer: torch.nn.Module, s, b_in, b_out, shard_sizes: list[int]):
    """Compress S (one matrix, or one per shard when the shards' B_in differ); return ``apply``."""
    cutlass = not torch.backends.cusparselt.is_available()
    per_shard = b_in is not None and b_in.shape[0] > 1
    parts = [_sparse_cls(cutlass).from_dense(p.contiguous()) for p in (s.split(shard_sizes) if per_shard else [s])]
    set_params(layer, b_in=b_in, b_out=b_out)
    for i, p in enumerate(parts):
        set_params(layer, **{f"s_packed{i}": p.packed, f"s_meta{i}": p.meta if cutlass else None})
    n = len(parts)

    def apply(layer, x, bias=None):
        packed = [getattr(layer, f"s_packed{i}") for i in range(n)]
        meta = [getattr(layer, f"s_meta{i}") for i in range(n)] if cutlass else []
        return torch.ops.armor.semi_structured(x, packed, meta, layer.b_in, layer.b_out, bias, shard_sizes, cutlass)

    return apply


def semi_structured_linear(x, packed: list[torch.Tensor], meta: list[torch.Tensor], b_in, b_out, bias,
                           shard_sizes: list[int], cutlass: bool) -> torch.Tensor:
    """The body of ``armor::semi_structured``: y = blockapply(sparse(S) · blockapply(x, B_in), B_out)."""
    k = x.shape[-1]
    rows = sum(shard_sizes) if len(packed) == 1 else None

    def linear(xs, i):
        j = max(i, 0)
        w = _sparse_cls(cutlass)(torch.Size([rows or shard_sizes[j], k]), packed=packed[j],
                                 meta=meta[j] if cutlass else None, packed_t=None, meta_t=None,
                                 compressed_swizzled_bitmask=None)
        return F.linear(xs.reshape(-1, k), w).reshape(*x.shape[:-1], -1)

    y = per_shard_linear(x, b_in, shard_sizes, linear)
    if b_out is not None:
        y = block_apply(y, b_out)
    return y if bias is None else y + bias
