"""Backends that apply an ARMOR layer, one file each; :func:`select` picks one per process.

- ``fold``: W_eff = B_out·S·B_in multiplied out at load time, then vLLM's dense GEMM (any device).
- ``sandwich``: the unfolded reference, bmm(B_in) → dense S → bmm(B_out); for tests.
- ``semi_structured``: as sandwich, with S a 2:4 sparse matrix on CUDA sm80+ (fp16/bf16); ``auto``
  uses it only where it passed its load-time trial (``selfcheck``: correct, and faster than the fold).
- ``sparse_cpu``: S kept 2:4-compressed, multiplied by the C++ kernel in ``armor_vllm/csrc`` (x86 CPUs).

Each module's ``prepare(layer, s, b_in, b_out, shard_sizes)`` registers what it needs on the
layer and returns ``apply(layer, x, bias)``.
"""
from __future__ import annotations

import torch

from armor_vllm.kernels import fold, ops, sandwich, semi_structured, sparse_cpu  # noqa: F401  (ops registers torch.ops.armor)

BACKENDS = {"fold": fold, "sandwich": sandwich, "semi_structured": semi_structured, "sparse_cpu": sparse_cpu}
ENV_VAR = "ARMOR_VLLM_BACKEND"


def select(requested: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(backend name, why) for ``ARMOR_VLLM_BACKEND=requested`` on this device and dtype."""
    if requested == "auto" and device.type == "cpu":
        why_not = sparse_cpu.unavailable(device, dtype)
        return ("fold", f"auto: {why_not}") if why_not else ("sparse_cpu", f"auto: 2:4 CPU kernel, {sparse_cpu.level()}")
    if requested == "auto":
        why_not = semi_structured.unsupported(device, dtype)
        if why_not:
            return "fold", f"auto: {why_not}"
        return "semi_structured", "auto: CUDA sm80+ with fp16/bf16, per layer shape if it passes its trial"
    if requested not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={requested!r}: expected one of {['auto', *BACKENDS]}")
    if requested == "semi_structured" and not semi_structured.available(device):
        raise ValueError(f"{ENV_VAR}=semi_structured needs a CUDA GPU with compute capability >= 8.0, "
                         f"the model is on {device}")
    if requested == "sparse_cpu" and (why_not := sparse_cpu.unavailable(device, dtype)):
        raise ValueError(f"{ENV_VAR}=sparse_cpu: {why_not}")
    return requested, f"{ENV_VAR}={requested}"
