"""One backend choice per layer, shared by the vLLM plugin and the transformers quantizer.

``ARMOR_VLLM_BACKEND`` asks for a backend ("auto": the fastest this device supports); shapes a 2:4
kernel cannot take fall back to the fold; an auto-chosen backend that no GPU run has proven yet
(CUDA 2:4) is used only once the first layer passed its self-check against the fold, else the
fold serves the rest of the process. Each decision is logged once per process.
"""
from __future__ import annotations

import logging
import os

from armor_vllm import kernels
from armor_vllm.format import unpack_24
from armor_vllm.kernels.selfcheck import self_check

logger = logging.getLogger("vllm.armor_vllm")  # under "vllm", so vLLM's handler prints it when serving
_self_check_failures: dict[str, str | None] = {}  # auto-chosen backend -> why it failed (None: passed)
_logged: set[str] = set()


def _once(level: int, msg: str, *args) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.log(level, msg, *args)


def prepare_layer(layer, values, bitmask, b_in, b_out, widths: list[int], fold):
    """``apply(layer, x, bias)`` for one layer stored as values [N, K/2] + bitmask [N, K/8] (format v1);
    ``fold(layer, s, b_in, b_out, widths)`` prepares the dense fallback the caller runs (vLLM's own GEMM
    in the plugin, ``F.linear`` in transformers).

    ``sparse_cpu`` takes values and bitmask as they are; the dense S is built only for the backends
    that need it (fold, sandwich, semi_structured).
    """
    requested = os.environ.get(kernels.ENV_VAR, "auto").lower()
    backend, why = kernels.select(requested, values.device, values.dtype)
    if backend == "sparse_cpu":
        _once(logging.INFO, "ARMOR: %s backend (%s)", backend, why)
        return kernels.sparse_cpu.prepare_compressed(layer, values, bitmask, b_in, b_out, widths)
    s = unpack_24(values, bitmask)
    if backend == "semi_structured":
        misfit = kernels.semi_structured.misfit(s, widths, b_in is not None and len(b_in) > 1)
        if misfit:
            _once(logging.WARNING, "ARMOR: layers whose shapes do not fit 2:4 sparse kernels use the dense fold "
                  "instead (first: %s: %s)", getattr(layer, "prefix", "?"), misfit)
            backend = "fold"
    if backend == "semi_structured" and requested == "auto":
        return _checked(layer, backend, s, b_in, b_out, widths, fold)
    _once(logging.INFO, "ARMOR: %s backend (%s)", backend, why)
    return (fold if backend == "fold" else kernels.BACKENDS[backend].prepare)(layer, s, b_in, b_out, widths)


def _checked(layer, backend: str, s, b_in, b_out, widths, fold):
    if backend not in _self_check_failures:
        before = set(layer._parameters)
        apply = kernels.BACKENDS[backend].prepare(layer, s, b_in, b_out, widths)
        failure = _self_check_failures[backend] = self_check(apply, layer, s, b_in, b_out, widths)
        where = getattr(layer, "prefix", "the first layer")
        if failure is None:
            logger.info("ARMOR: %s backend (auto: passed its self-check on %s)", backend, where)
            return apply
        logger.warning("ARMOR: fold backend (auto: %s failed its self-check on %s: %s)", backend, where, failure)
        for name in set(layer._parameters) - before:
            delattr(layer, name)
    elif _self_check_failures[backend] is None:
        return kernels.BACKENDS[backend].prepare(layer, s, b_in, b_out, widths)
    return fold(layer, s, b_in, b_out, widths)
