"""The checkpoint's metadata: config.json's ``quantization_config``, names and size arithmetic.

Field names follow compressed-tensors so that tools that read its configs recognise ours.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # v1: kept values in the model dtype only; v2 adds int8 kept values (config_groups)
QUANT_METHOD = "armor"
METHODS = ("armor", "nowag-p", "sparsegpt", "wanda", "magnitude")
SUFFIXES = ("weight_values", "weight_bitmask", "weight_scale", "b_in", "b_out", "bias")
# Kept values as stored: compressed-tensors' CompressionFormat names ("dense": the model dtype as is,
# "int-quantized": int8 beside a weight_scale) and its preset scheme names (--scheme).
DENSE, INT_QUANTIZED = "dense", "int-quantized"
SCHEMES = ("none", "W8A16")
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


@dataclass(frozen=True)
class QuantizationArgs:
    """compressed-tensors' ``QuantizationArgs`` of the kept values, the fields ARMOR stores. The one setting
    readers accept (W8A16): 8-bit int, symmetric (no zero point), one static scale per output channel."""

    num_bits: int = 8
    type: str = "int"
    symmetric: bool = True
    strategy: str = "channel"
    dynamic: bool = False


@dataclass(frozen=True)
class QuantizationScheme:
    """One entry of compressed-tensors' ``config_groups``: which modules, and how their weights are quantized
    (activations stay in the model dtype: A16)."""

    targets: list[str]
    weights: QuantizationArgs
    input_activations: None = None
    output_activations: None = None


W8A16 = QuantizationArgs()


def _scheme(name: str, d) -> QuantizationScheme:
    """A config_groups entry from its JSON form; a key compressed-tensors has but ARMOR does not store is an error."""
    if isinstance(d, QuantizationScheme):
        return d
    where = f"quantization_config.config_groups.{name}"
    if not isinstance(d, dict) or not isinstance(d.get("targets"), list) \
            or not isinstance(d.get("weights"), (dict, QuantizationArgs)):
        raise ArmorFormatError(f"{where}: expected {{'targets': [...], 'weights': {{...}}}}, got {d!r}")
    fields = set(QuantizationScheme.__dataclass_fields__)
    if unknown := sorted(set(d) - fields):
        raise ArmorFormatError(f"{where}: unknown fields {unknown} (ARMOR stores {sorted(fields)})")
    weights = d["weights"]
    if isinstance(weights, dict):
        if unknown := sorted(set(weights) - set(QuantizationArgs.__dataclass_fields__)):
            raise ArmorFormatError(f"{where}.weights: unknown fields {unknown} "
                                   f"(ARMOR stores {sorted(QuantizationArgs.__dataclass_fields__)})")
        weights = QuantizationArgs(**weights)
    return QuantizationScheme(**{**d, "weights": weights})


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
    format: str = DENSE                                          # how the kept values are stored (v2)
    config_groups: dict[str, QuantizationScheme] | None = None   # their quantization; None: model dtype (v2)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ArmorFormatError(f"quantization_config.method={self.method!r}: expected one of {METHODS}")
        if self.block_size is not None and (self.block_size <= 0 or self.block_size % 4):
            raise ArmorFormatError(
                f"quantization_config.block_size={self.block_size}: expected a positive multiple of 4 or null"
            )
        if self.config_groups is not None:
            if not isinstance(self.config_groups, dict) or len(self.config_groups) != 1:
                raise ArmorFormatError(f"quantization_config.config_groups={self.config_groups!r}: expected one group "
                                       "(every compressed linear's kept values quantized alike) or null")
            self.config_groups = {k: _scheme(k, v) for k, v in self.config_groups.items()}
        self._check_quantization()

    def _check_quantization(self) -> None:
        """The combinations readers know: dense kept values, or W8A16 (int8, symmetric, per output channel)."""
        if self.format not in (DENSE, INT_QUANTIZED):
            raise ArmorFormatError(f"quantization_config.format={self.format!r}: expected {DENSE!r} or {INT_QUANTIZED!r}")
        if (self.format == INT_QUANTIZED) != (self.config_groups is not None):
            raise ArmorFormatError(f"quantization_config.format={self.format!r} with config_groups="
                                   f"{'null' if self.config_groups is None else 'set'}: {INT_QUANTIZED!r} goes with "
                                   f"one config_groups entry, {DENSE!r} with none")
        for name, group in (self.config_groups or {}).items():
            where = f"quantization_config.config_groups.{name}"
            if list(group.targets) != list(self.targets):
                raise ArmorFormatError(f"{where}.targets={group.targets!r}: expected the config's targets "
                                       f"{self.targets!r} (every compressed linear is quantized alike)")
            for act in ("input_activations", "output_activations"):
                if getattr(group, act) is not None:
                    raise ArmorFormatError(f"{where}.{act}={getattr(group, act)!r}: expected null "
                                           "(W8A16: activations stay in the model dtype)")
            for f, want in asdict(W8A16).items():
                if getattr(group.weights, f) != want:
                    raise ArmorFormatError(f"{where}.weights.{f}={getattr(group.weights, f)!r}: expected {want!r} "
                                           "(this armor-vllm reads W8A16: int8, symmetric, static, per output channel)")

    @property
    def quantized(self) -> bool:
        """Kept values stored as int8 beside a per-row weight_scale."""
        return self.config_groups is not None

    @property
    def scheme(self) -> str:
        """The converter's --scheme that writes this config (compressed-tensors' preset name)."""
        return "W8A16" if self.quantized else "none"

    @classmethod
    def with_scheme(cls, scheme: str, **fields) -> "ArmorQuantizationConfig":
        """A config whose kept values follow ``scheme`` (one of SCHEMES)."""
        if scheme not in SCHEMES:
            raise ArmorFormatError(f"scheme {scheme!r}: expected one of {SCHEMES}")
        if scheme == "none":
            return cls(**fields)
        targets = fields.get("targets", ["Linear"])
        return cls(**fields, format=INT_QUANTIZED,
                   config_groups={"group_0": QuantizationScheme(targets=list(targets), weights=W8A16)})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ArmorQuantizationConfig":
        if d.get("quant_method") != QUANT_METHOD:
            raise ArmorFormatError(f"{source}: quantization_config.quant_method={d.get('quant_method')!r}, expected 'armor'")
        version = d.get("format_version")
        if version not in READ_VERSIONS:
            raise ArmorFormatError(
                f"{source}: quantization_config.format_version={version!r}, "
                f"expected one of {READ_VERSIONS} (this armor-vllm reads formats v1 to v{FORMAT_VERSION})"
            )
        if d.get("sparsity_structure", "2:4") != "2:4":
            raise ArmorFormatError(f"{source}: sparsity_structure={d['sparsity_structure']!r}, expected '2:4'")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ArmorFormatError(f"{source}: unknown quantization_config fields {sorted(unknown)}")
        kw = dict(d)
        kw["calibration"] = CalibrationRecord(**kw.get("calibration", {}))
        try:
            cfg = cls(**kw)
        except ArmorFormatError as e:
            raise ArmorFormatError(f"{source}: {e}") from None
        if version == 1 and cfg.quantized:
            raise ArmorFormatError(f"{source}: quantization_config.format_version=1 with config_groups: "
                                   "int8 kept values are format v2")
        return cfg


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
