"""The load-time trial of a backend no GPU run has proven (CUDA 2:4): correct here, and faster here?

``auto`` may pick ``semi_structured``, which depends on PyTorch's prototype 2:4 kernels, the GPU,
cuSPARSELt or CUTLASS, and the layer's shape. Before a layer uses it, :func:`trial` runs every step
of that path on the layer — compression, forwards at decode sizes 1-7 (the dense operand is padded
to the kernel's row multiple) and at a prefill size, compared with W_eff = B_out·S·B_in — and, for a
layer shape not seen yet, races it against the fold. Any exception or mismatch, or a lost race,
leaves the layer as it was, so the caller's fold takes it cleanly.

The race replays each backend from a CUDA graph, as vLLM's default mode runs it (eager Python
overhead would otherwise decide at decode sizes), so a kernel that cannot be captured fails here
instead of in vLLM's graph capture. :func:`semi_structured_wins` turns the timings into the choice.
"""
from __future__ import annotations

import torch

from armor_vllm.kernels.fold import fold_weight

PROBE_TOKENS = (1, 2, 3, 4, 5, 6, 7, 512)
# relative Frobenius error allowed against the fp32 fold: a few units of the dtype's rounding
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# decode at one sequence and at a small batch (what users feel), and one prefill chunk
RACE_TOKENS = (1, 16, 512)
# a gain below this fraction of the fold's time is within a micro-benchmark's noise and the rest of the step
MARGIN = 0.05


def self_check(apply, layer: torch.nn.Module, s: torch.Tensor, b_in, b_out, shard_sizes: list[int]) -> str | None:
    """None if ``apply(layer, x)`` matches the fold at every probe size, else why not."""
    w = fold_weight(s, b_in, b_out, shard_sizes)
    gen = torch.Generator(device="cpu").manual_seed(0)
    for t in PROBE_TOKENS:
        x = torch.randn(t, s.shape[1], generator=gen).to(s.device, s.dtype)
        ref = x.float() @ w.t()
        try:
            got = apply(layer, x, None).float()
        except Exception as e:  # noqa: BLE001  (any failure of the candidate means: do not use it)
            return f"probe forward at {t} tokens failed: {type(e).__name__}: {e}"
        if got.shape != ref.shape:
            return f"probe output shape {list(got.shape)} at {t} tokens, expected {list(ref.shape)}"
        err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
        tol = TOLERANCE.get(s.dtype, 3e-2)
        if not err <= tol:  # also catches NaN
            return (f"probe output at {t} tokens off by {err:.2e} relative to the fold "
                    f"(tolerance {tol:.0e} for {s.dtype})")
    return None


def semi_structured_wins(timings: dict[int, tuple[float, float]], margin: float = MARGIN) -> bool:
    """``timings``: token count -> (semi_structured s, fold s) per call.

    The 2:4 path must be faster by ``margin`` at every measured size: decode is what users feel
    most, and a prefill gain does not pay for a slower decode (nor the reverse). Missing or
    non-finite numbers (NaN compares false) mean the fold.
    """
    return bool(timings) and all(sparse <= (1 - margin) * fold for sparse, fold in timings.values())


def trial(prepare, fold, layer: torch.nn.Module, s: torch.Tensor, b_in, b_out, shard_sizes: list[int],
          race: bool):
    """(apply or None, failure or None, timings or None) for the candidate ``prepare`` on ``layer``.

    apply is None when the layer must take the fold: then no parameter of the candidate is left on
    it. A failure (exception in compression, a probe or the race; a mismatch) disqualifies the
    candidate for the process; a lost race only for this shape. ``fold`` is timed on a scratch module.
    """
    before = set(layer._parameters)
    apply, failure, timings, step = None, None, None, "compression"
    try:
        apply = prepare(layer, s, b_in, b_out, shard_sizes)
        step = "self-check"
        failure = self_check(apply, layer, s, b_in, b_out, shard_sizes)
        if failure is None and race:
            step = "race against the fold"
            scratch = torch.nn.Module()
            scratch.prefix = getattr(layer, "prefix", "")
            timings = race_against_fold(apply, layer, fold(scratch, s, b_in, b_out, shard_sizes), scratch, s)
    except Exception as e:  # noqa: BLE001  (compression or graph capture failing is the candidate failing)
        failure = f"{step} failed: {type(e).__name__}: {e}"
    if failure is not None or (timings is not None and not semi_structured_wins(timings)):
        for name in set(layer._parameters) - before:
            delattr(layer, name)
        apply = None
    return apply, failure, timings


def race_against_fold(apply, layer, fold_apply, fold_layer, s: torch.Tensor) -> dict[int, tuple[float, float]]:
    """token count -> (candidate s, fold s) per call, at :data:`RACE_TOKENS` (CUDA only)."""
    timings = {}
    for t in RACE_TOKENS:
        x = torch.randn(t, s.shape[1], device=s.device, dtype=s.dtype)
        timings[t] = (graph_seconds(apply, layer, x), graph_seconds(fold_apply, fold_layer, x))
    return timings


def graph_seconds(apply, layer, x: torch.Tensor, calls: int = 10, replays: int = 5) -> float:
    """Seconds per ``apply(layer, x)`` replayed from a CUDA graph: GPU time without launch overhead."""
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph asks
        for _ in range(3):
            apply(layer, x, None)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(calls):
            apply(layer, x, None)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / (calls * replays)
