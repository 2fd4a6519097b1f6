"""The format's rules for one compressed linear: names, shapes, dtypes, exactly 2 of every 4, finiteness.

One validator for the writer, the reader and the vLLM loader, so a bad tensor is named the same way everywhere.
"""
from __future__ import annotations

import torch

from .schema import SUFFIXES, ArmorFormatError, ArmorQuantizationConfig
from .tensors import unpack_mask

# bitmask byte -> both its groups of 4 (low nibble: columns 8j..8j+3, high: 8j+4..8j+7) keep exactly 2
_TWO_OF_FOUR = torch.tensor([bin(b & 15).count("1") == 2 and bin(b >> 4).count("1") == 2 for b in range(256)])


def fail(file: str, tensor: str, msg: str):
    raise ArmorFormatError(f"{file}: tensor '{tensor}': {msg}")


def validate_layer(prefix: str, tensors: dict[str, torch.Tensor], qcfg: ArmorQuantizationConfig,
                   dtype: torch.dtype | None = None, files: dict[str, str] | None = None) -> None:
    """Check one compressed linear's tensors (keys are suffixes) against format v2 (v1 is v2 without int8 values).

    ``dtype``: the model's, which every floating tensor must have (None: not checked, as in vLLM, which
    holds the layer in its own dtypes)."""
    files = files or {}
    where = lambda s: files.get(s, "<memory>")  # noqa: E731
    name = lambda s: f"{prefix}.{s}"  # noqa: E731
    want_b, quantized = qcfg.block_size is not None, qcfg.quantized
    required = (["weight_values", "weight_bitmask"] + (["weight_scale"] if quantized else [])
                + (["b_in", "b_out"] if want_b else []))
    for s in required:
        if s not in tensors:
            fail(where("weight_values"), name(s), f"missing (method {qcfg.method}, block_size {qcfg.block_size}, "
                 f"scheme {qcfg.scheme} requires it)")
    for s in tensors:
        if s not in SUFFIXES or (s in ("b_in", "b_out") and not want_b) or (s == "weight_scale" and not quantized):
            fail(where(s), name(s), f"unexpected tensor; a compressed layer of this checkpoint (scheme {qcfg.scheme}) "
                 f"holds {required + ['bias']}")
    values, bitmask = tensors["weight_values"], tensors["weight_bitmask"]
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 2:
        fail(where("weight_bitmask"), name("weight_bitmask"), f"expected 2-D uint8, got {bitmask.dtype} {list(bitmask.shape)}")
    n, k = bitmask.shape[0], bitmask.shape[1] * 8
    if values.dim() != 2 or list(values.shape) != [n, k // 2]:
        fail(where("weight_values"), name("weight_values"), f"shape {list(values.shape)}, expected [{n}, {k // 2}] (N, K/2 from the bitmask)")
    if quantized != (values.dtype == torch.int8):
        fail(where("weight_values"), name("weight_values"), f"dtype {values.dtype}, expected "
             + ("int8 (quantization_config.format 'int-quantized')" if quantized else "the model's floating dtype "
                "(quantization_config.format 'dense'; int8 values need config_groups W8A16)"))
    if quantized:
        scale = tensors["weight_scale"]
        if list(scale.shape) != [n, 1] or not scale.is_floating_point():
            fail(where("weight_scale"), name("weight_scale"), f"{scale.dtype} {list(scale.shape)}, expected a floating "
                 f"[{n}, 1] (one symmetric scale per output channel)")
    if dtype is not None:
        for s, t in tensors.items():
            if s != "weight_bitmask" and not (s == "weight_values" and quantized) and t.dtype != dtype:
                fail(where(s), name(s), f"dtype {t.dtype}, expected {dtype} (config.json torch_dtype)")
    if not _TWO_OF_FOUR[bitmask.to(torch.int32).cpu()].all():  # fast path; the bool mask only to name a bad group
        counts = unpack_mask(bitmask, k).reshape(n, k // 4, 4).sum(-1)
        bad = (counts != 2).nonzero()
        r, g = bad[0].tolist()
        fail(where("weight_bitmask"), name("weight_bitmask"),
             f"row {r}, columns {4 * g}..{4 * g + 3} keep {int(counts[r, g])} positions, expected exactly 2 of every 4 ({len(bad)} bad groups)")
    if want_b:
        b = qcfg.block_size
        for s, dim in (("b_in", k), ("b_out", n)):
            if dim % b:
                fail(where(s), name(s), f"block_size {b} does not divide {'K' if s == 'b_in' else 'N'}={dim}")
            if list(tensors[s].shape) != [dim // b, b, b]:
                fail(where(s), name(s), f"shape {list(tensors[s].shape)}, expected [{dim // b}, {b}, {b}]")
    if "bias" in tensors and list(tensors["bias"].shape) != [n]:
        fail(where("bias"), name("bias"), f"shape {list(tensors['bias'].shape)}, expected [{n}]")
    for s, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            fail(where(s), name(s), "contains NaN or Inf")


def compressed_prefixes(names) -> list[str]:
    """Prefixes of compressed linears: every name ending in '.weight_values' or '.weight_bitmask'."""
    out = set()
    for nm in names:
        for s in ("weight_values", "weight_bitmask"):
            if nm.endswith("." + s):
                out.add(nm[: -len(s) - 1])
    return sorted(out)
