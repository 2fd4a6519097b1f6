"""A load-time check of an untested backend against the fold, on one layer and a fixed probe input.

`auto` may pick a backend that no GPU run has proven yet (CUDA 2:4). Before trusting it for a
whole model, its output on the first layer must match W_eff = B_out·S·B_in within the dtype's
rounding; a mismatch or an exception means the fold for the rest of the process.
"""
from __future__ import annotations

import torch

from armor_vllm.kernels.fold import fold_weight

PROBE_TOKENS = 8
# relative Frobenius error allowed against the fp32 fold: a few units of the dtype's rounding
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def self_check(apply, layer: torch.nn.Module, s: torch.Tensor, b_in, b_out, shard_sizes: list[int]) -> str | None:
    """None if ``apply(layer, x)`` matches the fold on a fixed probe, else why not."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(PROBE_TOKENS, s.shape[1], generator=gen).to(s.device, s.dtype)
    ref = x.float() @ fold_weight(s, b_in, b_out, shard_sizes).t()
    try:
        got = apply(layer, x, None).float()
    except Exception as e:  # noqa: BLE001  (any failure of the candidate means: do not use it)
        return f"probe forward failed: {type(e).__name__}: {e}"
    if got.shape != ref.shape:
        return f"probe output shape {list(got.shape)}, expected {list(ref.shape)}"
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
    tol = TOLERANCE.get(s.dtype, 3e-2)
    if not err <= tol:  # also catches NaN
        return f"probe output off by {err:.2e} relative to the fold (tolerance {tol:.0e} for {s.dtype})"
    return None
