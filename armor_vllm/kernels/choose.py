"""One backend choice per layer, shared by the vLLM plugin and the transformers quantizer.

``ARMOR_VLLM_BACKEND`` asks for a backend ("auto": the fastest this device supports); shapes a 2:4
kernel cannot take fall back to the fold. An auto-chosen backend that no GPU run has proven yet
(CUDA 2:4) goes through :func:`armor_vllm.kernels.selfcheck.trial` on a layer: any failure means the
fold for the rest of the process; for each new layer shape it must also beat the fold in a timed
race, else that shape takes the fold. This runs in ``process_weights_after_loading``, before vLLM
compiles the model and captures its CUDA graphs. Each decision is logged once per process (per shape
for races).
"""
from __future__ import annotations

import logging
import os

import torch

from armor_vllm import kernels
from armor_vllm.format import dequantize, unpack_24
from armor_vllm.kernels.selfcheck import trial

logger = logging.getLogger("vllm.armor_vllm")  # under "vllm", so vLLM's handler prints it when serving
_self_check_failures: dict[str, str] = {}  # auto-chosen backend -> why it failed its trial in this process
_race_won: dict[tuple, bool] = {}  # (N, K, block, widths, B_in slots, device, dtype) -> the candidate was faster
_logged: set[str] = set()


def _once(level: int, msg: str, *args) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.log(level, msg, *args)


def prepare_layer(layer, values, bitmask, b_in, b_out, widths: list[int], fold, scale=None):
    """``apply(layer, x, bias)`` for one layer stored as values [N, K/2] + bitmask [N, K/8] (format v2);
    ``fold(layer, s, b_in, b_out, widths)`` prepares the dense fallback the caller runs (vLLM's own GEMM
    in the plugin, ``F.linear`` in transformers). int8 values come with ``scale`` [N, 1] in the model dtype.

    ``sparse_cpu`` takes values and bitmask as they are (int8 values too, with the scale as fp32 [N]); the
    dense S, dequantized to the model dtype, is built only for the backends that need it (fold, sandwich,
    semi_structured).
    """
    requested = os.environ.get(kernels.ENV_VAR, "auto").lower()
    dtype = values.dtype if scale is None else scale.dtype
    backend, why = kernels.select(requested, values.device, dtype)
    if backend == "sparse_cpu":
        _once(logging.INFO, "ARMOR: %s backend (%s)", backend, why)
        return kernels.sparse_cpu.prepare_compressed(
            layer, values, bitmask, b_in, b_out, widths,
            scale=None if scale is None else scale.float().reshape(-1).contiguous())
    s = unpack_24(dequantize(values, scale, dtype), bitmask)
    if backend == "semi_structured":
        misfit = kernels.semi_structured.misfit(s, widths, b_in is not None and len(b_in) > 1)
        if misfit:
            _once(logging.WARNING, "ARMOR: layers whose shapes do not fit 2:4 sparse kernels use the dense fold "
                  "instead (first: %s: %s)", getattr(layer, "prefix", "?"), misfit)
            backend = "fold"
    if backend == "semi_structured" and requested == "auto":
        return _auto_cuda(layer, backend, s, b_in, b_out, widths, fold)
    _once(logging.INFO, "ARMOR: %s backend (%s)", backend, why)
    return (fold if backend == "fold" else kernels.BACKENDS[backend].prepare)(layer, s, b_in, b_out, widths)


def _auto_cuda(layer, backend: str, s, b_in, b_out, widths, fold):
    """The candidate where it passed its trial and won its race for this shape, else the fold."""
    where = getattr(layer, "prefix", "?")
    if backend not in _self_check_failures and _capturing(s):
        _once(logging.WARNING, "ARMOR: fold backend (auto: %s cannot be checked or timed inside CUDA graph capture "
              "or torch.compile; first forward of %s)", backend, where)
        return fold(layer, s, b_in, b_out, widths)
    key = (*s.shape, None if b_out is None else b_out.shape[-1], tuple(widths), 0 if b_in is None else len(b_in),
           str(s.device), s.dtype)
    if backend in _self_check_failures or _race_won.get(key) is False:
        return fold(layer, s, b_in, b_out, widths)
    apply, failure, timings = trial(kernels.BACKENDS[backend].prepare, fold, layer, s, b_in, b_out, widths,
                                    race=key not in _race_won)
    if failure is not None:
        _self_check_failures[backend] = failure
        logger.warning("ARMOR: fold backend for the rest of this process (auto: %s failed on %s: %s)",
                       backend, where, failure)
    elif timings is not None:
        _race_won[key] = apply is not None
        sizes = sorted(timings)
        logger.info("ARMOR: %s backend for layers of shape [%d, %d] (block %s, shards %s, %d B_in) on %s %s "
                    "(auto: %s %s µs vs fold %s µs per call at %s tokens, raced on %s)",
                    backend if apply else "fold", *key[:5], torch.cuda.get_device_name(s.device), s.dtype, backend,
                    "/".join(f"{timings[t][0] * 1e6:.1f}" for t in sizes),
                    "/".join(f"{timings[t][1] * 1e6:.1f}" for t in sizes), "/".join(map(str, sizes)), where)
    return apply or fold(layer, s, b_in, b_out, widths)


def _capturing(s) -> bool:
    """Weights prepared lazily inside a traced or captured forward (transformers), where nothing may be timed."""
    return torch.compiler.is_compiling() or (s.is_cuda and torch.cuda.is_current_stream_capturing())
