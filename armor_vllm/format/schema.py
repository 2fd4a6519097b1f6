"""The checkpoint's metadata: config.json's ``quantization_config``, names and size arithmetic.

Field names follow compressed-tensors so that tools that read its configs recognise ours.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 1
QUANT_METHOD = "armor"
METHODS = ("armor", "nowag-p", "sparsegpt", "wanda", "magnitude")
SUFFIXES = ("weight_values", "weight_bitmask", "b_in", "b_out", "bias")
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3
# What a reader that does not know quant_method "armor" needs to know; transformers without
# `import armor_vllm` only warns that it skips quantization and loads random linear weights.
REQUIRES = ("armor-vllm (pip install armor-vllm): vLLM loads its plugin by itself; transformers needs "
            "`import armor_vllm` before from_pretrained, else it warns and re-initialises every compressed linear")


class ArmorFormatError(ValueError):
    """A checkpoint that breaks the format; the message names file, tensor and expectation."""


@dataclass
class CalibrationRecord:
    dataset: str = ""
    num_samples: int = 0
    seq_len: int = 0


@dataclass
class ArmorQuantizationConfig:
    """``quantization_config`` in config.json (field names follow compressed-tensors)."""

    block_size: int | None = 64
    method: str = "armor"
    targets: list[str] = field(default_factory=lambda: ["Linear"])
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    shared_input_transform: bool = False
    calibration: CalibrationRecord = field(default_factory=CalibrationRecord)
    method_args: dict = field(default_factory=dict)
    quant_method: str = QUANT_METHOD
    format_version: int = FORMAT_VERSION
    sparsity_structure: str = "2:4"
    requires: str = REQUIRES  # informational, for people and tools reading config.json; readers ignore it

    def __post_init__(self):
        if self.method not in METHODS:
            raise ArmorFormatError(f"quantization_config.method={self.method!r}: expected one of {METHODS}")
        if self.block_size is not None and (self.block_size <= 0 or self.block_size % 4):
            raise ArmorFormatError(
                f"quantization_config.block_size={self.block_size}: expected a positive multiple of 4 or null"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ArmorQuantizationConfig":
        if d.get("quant_method") != QUANT_METHOD:
            raise ArmorFormatError(f"{source}: quantization_config.quant_method={d.get('quant_method')!r}, expected 'armor'")
        if d.get("format_version") != FORMAT_VERSION:
            raise ArmorFormatError(
                f"{source}: quantization_config.format_version={d.get('format_version')!r}, "
                f"expected {FORMAT_VERSION} (this armor-vllm reads format v{FORMAT_VERSION} only)"
            )
        if d.get("sparsity_structure", "2:4") != "2:4":
            raise ArmorFormatError(f"{source}: sparsity_structure={d['sparsity_structure']!r}, expected '2:4'")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ArmorFormatError(f"{source}: unknown quantization_config fields {sorted(unknown)}")
        kw = dict(d)
        kw["calibration"] = CalibrationRecord(**kw.get("calibration", {}))
        return cls(**kw)


def overhead_ratio(shapes: list[tuple[int, int]], block_size: int) -> float:
    """Parameters of the B blocks relative to the dense weights: Σ(N+K)·b / Σ N·K."""
    return sum((n + k) * block_size for n, k in shapes) / max(1, sum(n * k for n, k in shapes))


# The HF linears vLLM fuses into one layer (packed_modules_mapping of Llama/Qwen): their
# ignore/compress decisions must agree, or vLLM refuses the checkpoint.
FUSED_SHARDS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# How vLLM splits them across tensor-parallel ranks: column-parallel along N, row-parallel along K.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")


def rank_width_problems(k: int, widths: list[int], block_size: int | None) -> list[str]:
    """Why one tensor-parallel rank's slice of a compressed linear cannot be stored (empty: it can): its K
    input features need whole bitmask bytes and B_in blocks, each output partition whole B_out blocks.
    The plugin checks this at load; the converter, for every tensor-parallel size, before anyone serves."""
    problems = [f"input features per rank K={k} % 8 != 0 (bitmask bytes)"] if k % 8 else []
    if block_size is not None:
        problems += [f"K={k} % block_size {block_size} != 0"] if k % block_size else []
        problems += [f"output partition {w} % block_size {block_size} != 0" for w in widths if w % block_size]
    return problems


def valid_block_sizes(dims: list[int]) -> list[int]:
    """Block sizes (multiples of 4) that divide every dimension in `dims`."""
    g = 0
    for d in dims:
        g = math.gcd(g, d)
    return [b for b in range(4, g + 1, 4) if g % b == 0]
