"""CPU 2:4 backend: S stays compressed in memory and a C++ kernel (``armor_vllm/csrc``) multiplies it.

The layer keeps the checkpoint's own layout, kept values [N, K/2] in the model dtype (or int8 with
a float32 scale per row, W8A16) plus the bitmask [N, K/8] (4 bits per group of 4: the bytes of
2-bit positions), and B_in/B_out as they are: ~0.56× the dense bytes for S (~0.31× in int8). One op call per layer, ``torch.ops.armor_<isa>.linear``, runs
B_in (per fused shard), S and B_out; small token blocks (decode) multiply straight from the
compressed S (from 8 tokens in bf16 only its kept values, tokens along the vector lanes), larger
ones (prefill) decompress L2-sized slabs for a dense GEMM.

The ISA level is the fastest one built whose instructions /proc/cpuinfo says this CPU has
(:mod:`armor_vllm.kernels.cpu_isa`); ``ARMOR_VLLM_CPU_ISA`` picks a lower one (tests, benchmarks).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from armor_vllm.format import mask_24, pack_24
from armor_vllm.kernels import cpu_isa, ops
from armor_vllm.kernels.sandwich import set_params

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ISA_ENV_VAR = "ARMOR_VLLM_CPU_ISA"
# Token count from which S is decompressed slab by slab for a dense GEMM (benchmarks/layer_speed.py
# --switch measures it: the kernel's time grows with every token, the slab path's barely). bf16 at
# the avx512 level has the kernel that multiplies only kept values, which holds out longer.
PREFILL_MIN_TOKENS = 32
PREFILL_MIN_TOKENS_WIDE = 64


def prefill_min_tokens(dtype: torch.dtype, isa_level: str) -> int:
    return PREFILL_MIN_TOKENS_WIDE if dtype == torch.bfloat16 and isa_level == "avx512" else PREFILL_MIN_TOKENS
_PACK_ROWS = 1024  # rows re-packed at a time at load: bounds the transient index tensors


@functools.cache
def loaded_levels() -> tuple[str, ...]:
    """The ISA levels this CPU runs and the install built, loaded into ``torch.ops``; fastest first."""
    levels = []
    for level in cpu_isa.runnable_levels(cpu_isa.cpu_flags()):
        spec = importlib.util.find_spec(cpu_isa.module_name(level))
        if spec is not None and spec.origin:
            ops.load_sparse_cpu_library(level, spec.origin)
            levels.append(level)
    return tuple(levels)


def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why this backend cannot run a layer on ``device`` in ``dtype``, or None if it can."""
    if device.type != "cpu":
        return f"the 2:4 CPU kernel runs on CPU, the model is on {device}"
    if dtype not in DTYPES:
        return f"the 2:4 CPU kernel has no {dtype} path"
    if not loaded_levels():
        if not cpu_isa.runnable_levels(cpu_isa.cpu_flags()):
            return "the 2:4 CPU kernel needs x86-64 with AVX2+FMA+F16C (per /proc/cpuinfo)"
        return ("the 2:4 CPU kernel was not built (pip install --no-build-isolation with a C++ compiler; "
                "see the install log)")
    return None


def level() -> str:
    """The ISA level layers use: the fastest loaded one, or ``ARMOR_VLLM_CPU_ISA`` if set."""
    levels = loaded_levels()
    want = os.environ.get(ISA_ENV_VAR)
    if want is None:
        return levels[0]
    if want not in levels:
        raise ValueError(f"{ISA_ENV_VAR}={want!r}: this CPU and install provide {list(levels)}")
    return want


def compress(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense 2:4 S [N, K] -> (values [N, K/2], bitmask uint8 [N, K/8]), the layout the kernel reads.

    Values keep S's dtype: int8 codes stay int8 (their row scale goes to :func:`prepare_compressed`)."""
    parts = [pack_24(rows, mask_24(rows)) for rows in s.split(_PACK_ROWS)]
    return torch.cat([v for v, _ in parts]), torch.cat([b for _, b in parts])


def prepare(layer: torch.nn.Module, s, b_in, b_out, shard_sizes: list[int], scale=None):
    """As :func:`prepare_compressed`, from a dense S (tests, benchmarks): compresses it first.
    S is in the model dtype, or int8 codes with their ``scale`` [N]."""
    values, bitmask = compress(s)
    return prepare_compressed(layer, values, bitmask, b_in, b_out, shard_sizes, scale)


def prepare_compressed(layer: torch.nn.Module, values, bitmask, b_in, b_out, shard_sizes: list[int], scale=None):
    """Keep S compressed and B_in/B_out on the layer; return the ``apply``.

    ``values`` [N, K/2] and ``bitmask`` uint8 [N, K/8] are the checkpoint's own tensors, which is the
    layout the kernel reads, so they are registered as they are: no dense S is built and nothing is
    re-packed at load. The op's ``check`` verifies them here, once: each call re-checks shapes and
    dtypes but trusts the bitmask's content (exactly 2 of every 4, an O(N·K/8) scan), which the
    AVX-512 kernels index by, so a malformed one raises here instead of reading out of bounds later.
    int8 values (W8A16) stay int8 in memory; their ``scale``, float32 [N], is registered as ``weight_scale``.
    """
    isa_level = level()
    ops_isa = getattr(torch.ops, f"armor_{isa_level}")
    values, bitmask = values.contiguous(), bitmask.contiguous()
    ops_isa.check(values, bitmask, b_in, b_out, shard_sizes, scale)
    set_params(layer, weight_values=values, weight_bitmask=bitmask, b_in=b_in, b_out=b_out, weight_scale=scale)
    op = ops_isa.linear
    prefill_min = prefill_min_tokens(values.dtype, isa_level)

    def apply(layer, x, bias=None):
        return op(x, layer.weight_values, layer.weight_bitmask, layer.b_in, layer.b_out, bias, shard_sizes, prefill_min,
                  layer.weight_scale)

    return apply
