"""ARMOR checkpoint format v1: the one module that knows tensor names (docs/format.md).

Both halves import it: the converter writes with :func:`write_checkpoint`, the vLLM plugin and
``armor-eval`` read with :func:`read_checkpoint`, and everyone validates with the same rules.
Each compressed linear ``<prefix>`` stores W = blockdiag(b_out) · S · blockdiag(b_in), with S
2:4 sparse along the input dimension, packed as kept values plus a bitmask.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from compressed_tensors.utils.helpers import (
    pack_bitmasks,
    unpack_bitmasks,
)
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
QUANT_METHOD = "armor"
METHODS = ("armor", "nowag-p", "sparsegpt", "wanda", "magnitude")
SUFFIXES = ("weight_values", "weight_bitmask", "b_in", "b_out", "bias")
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3


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


# ---------------------------------------------------------------- tensor math shared by both halves
def pack_24(weight: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, K] + 2:4 bool mask -> (values [N, K/2] in row order, bitmask uint8 [N, K/8])."""
    n, k = weight.shape
    values = weight[mask].reshape(n, k // 2)
    return values.contiguous(), pack_bitmasks(mask.cpu()).to(weight.device)


def mask_24(weight: torch.Tensor) -> torch.Tensor:
    """The 2:4 mask of a dense tensor that holds a 2:4 core (zeros at pruned positions).

    A kept weight may be exactly zero, so groups with fewer than 2 nonzeros are completed with
    their first zero positions; a group with more than 2 nonzeros is not 2:4 and is rejected.
    """
    n, k = weight.shape
    nz = (weight != 0).reshape(n, k // 4, 4)
    if (nz.sum(-1) > 2).any():
        r, g = (nz.sum(-1) > 2).nonzero()[0].tolist()
        raise ArmorFormatError(f"weight row {r}, columns {4 * g}..{4 * g + 3}: more than 2 nonzeros, not 2:4")
    # rank positions: nonzeros first, then zeros, by index; keep the first two
    order = torch.argsort((~nz).to(torch.int8) * 4 + torch.arange(4, device=weight.device), dim=-1)
    mask = torch.zeros_like(nz)
    mask.scatter_(-1, order[..., :2], True)
    return mask.reshape(n, k)


def unpack_mask(bitmask: torch.Tensor, k: int) -> torch.Tensor:
    """Bitmask uint8 [N, K/8] (little-endian bits) -> bool [N, K]."""
    return unpack_bitmasks(bitmask.cpu(), [bitmask.shape[0], k]).to(bitmask.device)


def unpack_24(values: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """(values [N, K/2], bitmask [N, K/8]) -> the dense sparse core S [N, K]."""
    n, k = values.shape[0], bitmask.shape[1] * 8
    mask = unpack_mask(bitmask, k)
    dense = torch.zeros(n, k, dtype=values.dtype, device=values.device)
    dense[mask] = values.reshape(-1)
    return dense


def block_diag_left(blocks: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """blockdiag(blocks) @ m for blocks [n/b, b, b] and m [n, k], without forming n×n."""
    nb, b, _ = blocks.shape
    return torch.bmm(blocks, m.reshape(nb, b, -1)).reshape(m.shape)


def block_diag_right(m: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """m @ blockdiag(blocks) for m [n, k] and blocks [k/b, b, b]."""
    kb, b, _ = blocks.shape
    return torch.einsum("nkb,kbc->nkc", m.reshape(m.shape[0], kb, b), blocks).reshape(m.shape)


def reconstruct(values, bitmask, b_in=None, b_out=None) -> torch.Tensor:
    """The dense weight W = blockdiag(b_out) · S · blockdiag(b_in) that a layer represents."""
    w = unpack_24(values, bitmask)
    if b_in is not None:
        w = block_diag_right(w, b_in.to(w.dtype))
    if b_out is not None:
        w = block_diag_left(b_out.to(w.dtype), w)
    return w


# ---------------------------------------------------------------- validation
def _fail(file: str, tensor: str, msg: str):
    raise ArmorFormatError(f"{file}: tensor '{tensor}': {msg}")


def validate_layer(prefix: str, tensors: dict[str, torch.Tensor], qcfg: ArmorQuantizationConfig,
                   dtype: torch.dtype | None = None, files: dict[str, str] | None = None) -> None:
    """Check one compressed linear's tensors (keys are suffixes) against format v1."""
    files = files or {}
    where = lambda s: files.get(s, "<memory>")  # noqa: E731
    name = lambda s: f"{prefix}.{s}"  # noqa: E731
    want_b = qcfg.block_size is not None
    required = ["weight_values", "weight_bitmask"] + (["b_in", "b_out"] if want_b else [])
    for s in required:
        if s not in tensors:
            _fail(where("weight_values"), name(s), f"missing (method {qcfg.method}, block_size {qcfg.block_size} requires it)")
    for s in tensors:
        if s not in SUFFIXES or (s in ("b_in", "b_out") and not want_b):
            _fail(where(s), name(s), f"unexpected tensor; a compressed layer holds {required + ['bias']}")
    values, bitmask = tensors["weight_values"], tensors["weight_bitmask"]
    if bitmask.dtype != torch.uint8 or bitmask.dim() != 2:
        _fail(where("weight_bitmask"), name("weight_bitmask"), f"expected 2-D uint8, got {bitmask.dtype} {list(bitmask.shape)}")
    n, k = bitmask.shape[0], bitmask.shape[1] * 8
    if values.dim() != 2 or list(values.shape) != [n, k // 2]:
        _fail(where("weight_values"), name("weight_values"), f"shape {list(values.shape)}, expected [{n}, {k // 2}] (N, K/2 from the bitmask)")
    if dtype is not None:
        for s, t in tensors.items():
            if s != "weight_bitmask" and t.dtype != dtype:
                _fail(where(s), name(s), f"dtype {t.dtype}, expected {dtype} (config.json torch_dtype)")
    counts = unpack_mask(bitmask, k).reshape(n, k // 4, 4).sum(-1)
    bad = (counts != 2).nonzero()
    if len(bad):
        r, g = bad[0].tolist()
        _fail(where("weight_bitmask"), name("weight_bitmask"),
              f"row {r}, columns {4 * g}..{4 * g + 3} keep {int(counts[r, g])} positions, expected exactly 2 of every 4 ({len(bad)} bad groups)")
    if want_b:
        b = qcfg.block_size
        for s, dim in (("b_in", k), ("b_out", n)):
            if dim % b:
                _fail(where(s), name(s), f"block_size {b} does not divide {'K' if s == 'b_in' else 'N'}={dim}")
            if list(tensors[s].shape) != [dim // b, b, b]:
                _fail(where(s), name(s), f"shape {list(tensors[s].shape)}, expected [{dim // b}, {b}, {b}]")
    if "bias" in tensors and list(tensors["bias"].shape) != [n]:
        _fail(where("bias"), name("bias"), f"shape {list(tensors['bias'].shape)}, expected [{n}]")
    for s, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            _fail(where(s), name(s), "contains NaN or Inf")


def compressed_prefixes(names) -> list[str]:
    """Prefixes of compressed linears: every name ending in '.weight_values' or '.weight_bitmask'."""
    out = set()
    for nm in names:
        for s in ("weight_values", "weight_bitmask"):
            if nm.endswith("." + s):
                out.add(nm[: -len(s) - 1])
    return sorted(out)


# ---------------------------------------------------------------- reading
@dataclass
class ArmorCheckpoint:
    path: Path
    config: dict                               # config.json
    qcfg: ArmorQuantizationConfig
    tensor_files: dict[str, str]               # tensor name -> shard file name

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.config.get("torch_dtype") or self.config.get("dtype") or "float32")

    def layer_prefixes(self) -> list[str]:
        return compressed_prefixes(self.tensor_files)

    def load(self, names) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for nm in names:
            by_file.setdefault(self.tensor_files[nm], []).append(nm)
        out = {}
        for f, nms in by_file.items():
            with safe_open(self.path / f, framework="pt") as fh:
                for nm in nms:
                    out[nm] = fh.get_tensor(nm)
        return out

    def layer(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors of one compressed linear, keyed by suffix."""
        names = [f"{prefix}.{s}" for s in SUFFIXES if f"{prefix}.{s}" in self.tensor_files]
        return {nm[len(prefix) + 1:]: t for nm, t in self.load(names).items()}

    def other_tensors(self) -> dict[str, torch.Tensor]:
        """Everything that is not part of a compressed linear (embeddings, norms, lm_head...)."""
        mine = {f"{p}.{s}" for p in self.layer_prefixes() for s in SUFFIXES}
        return self.load([n for n in self.tensor_files if n not in mine])

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """A plain HF state dict with every compressed linear reconstructed to `<prefix>.weight`."""
        sd = self.other_tensors()
        for p in self.layer_prefixes():
            t = self.layer(p)
            sd[f"{p}.weight"] = reconstruct(t["weight_values"], t["weight_bitmask"], t.get("b_in"), t.get("b_out"))
            if "bias" in t:
                sd[f"{p}.bias"] = t["bias"]
        return sd

    def validate(self) -> None:
        """Check every compressed layer, and that no linear is stored both dense and compressed."""
        for p in self.layer_prefixes():
            files = {s: self.tensor_files.get(f"{p}.{s}", "") for s in SUFFIXES}
            validate_layer(p, self.layer(p), self.qcfg, self.dtype, files)
            if f"{p}.weight" in self.tensor_files:
                _fail(self.tensor_files[f"{p}.weight"], f"{p}.weight",
                      "extra tensor: a compressed layer stores weight_values/weight_bitmask, not a dense weight")


def read_checkpoint(path: str | os.PathLike, validate: bool = False) -> ArmorCheckpoint:
    """Open an ARMOR checkpoint directory (reads headers only; tensors load lazily)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ArmorFormatError(f"{cfg_file}: missing; an ARMOR checkpoint is a Hugging Face model directory")
    config = json.loads(cfg_file.read_text())
    if "quantization_config" not in config:
        raise ArmorFormatError(f"{cfg_file}: no quantization_config; expected quant_method 'armor' (is this a dense model?)")
    qcfg = ArmorQuantizationConfig.from_dict(config["quantization_config"], str(cfg_file))
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (path / "model.safetensors").is_file():
        weight_map = {}
    else:
        raise ArmorFormatError(f"{path}: neither {INDEX_FILE} nor model.safetensors found")
    tensor_files: dict[str, str] = {}
    for f in sorted(set(weight_map.values())) or ["model.safetensors"]:
        if not (path / f).is_file():
            raise ArmorFormatError(f"{path / f}: shard listed in {INDEX_FILE} is missing")
        with safe_open(path / f, framework="pt") as fh:
            for nm in fh.keys():
                if weight_map and weight_map.get(nm) != f:
                    _fail(f, nm, f"extra tensor: not listed for this shard in {INDEX_FILE}")
                tensor_files[nm] = f
    for nm, f in weight_map.items():
        if nm not in tensor_files:
            _fail(f, nm, f"missing: listed in {INDEX_FILE} but absent from the shard")
    ckpt = ArmorCheckpoint(path, config, qcfg, tensor_files)
    if validate:
        ckpt.validate()
    return ckpt


# ---------------------------------------------------------------- writing
def layer_tensors(prefix: str, weight: torch.Tensor, b_in=None, b_out=None, bias=None,
                  mask: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of one compressed linear (S given dense, zeros at pruned positions)."""
    dtype = dtype or weight.dtype
    values, bitmask = pack_24(weight, mask_24(weight) if mask is None else mask)
    out = {f"{prefix}.weight_values": values.to(dtype), f"{prefix}.weight_bitmask": bitmask}
    for s, t in (("b_in", b_in), ("b_out", b_out), ("bias", bias)):
        if t is not None:
            out[f"{prefix}.{s}"] = t.to(dtype).clone()  # own storage: shared B_in is saved per layer
    return out


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, cur, size = [], {}, 0
    for nm in sorted(tensors):
        t = tensors[nm]
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[nm], size = t.contiguous(), size + nbytes
    return shards + [cur] if cur else shards


def write_checkpoint(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], hf_config: dict,
                     qcfg: ArmorQuantizationConfig, save_extras: Callable[[Path], None] | None = None,
                     overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a validated checkpoint atomically: a temp dir beside out_dir, renamed at the end.

    ``save_extras(tmp_dir)`` writes tokenizer files, generation_config.json and the like.
    A crash at any point leaves either the old directory or none, never a partial one.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite=True / --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        shards = _shards(tensors, max_shard_bytes)
        weight_map, total = {}, 0
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / fname, metadata={"format": "pt"})
            for nm, t in shard.items():
                weight_map[nm] = fname
                total += t.numel() * t.element_size()
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if save_extras is not None:
            save_extras(tmp)
        config = dict(hf_config)
        config["quantization_config"] = qcfg.to_dict()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        read_checkpoint(tmp, validate=True)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def weight_bytes(model_dir: str | os.PathLike) -> int:
    """Bytes of a model directory's safetensors shards (dense or ARMOR): its size on disk."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))


def overhead_ratio(shapes: list[tuple[int, int]], block_size: int) -> float:
    """Parameters of the B blocks relative to the dense weights: Σ(N+K)·b / Σ N·K."""
    return sum((n + k) * block_size for n, k in shapes) / max(1, sum(n * k for n, k in shapes))


def valid_block_sizes(dims: list[int]) -> list[int]:
    """Block sizes (multiples of 4) that divide every dimension in `dims`."""
    g = 0
    for d in dims:
        g = math.gcd(g, d)
    return [b for b in range(4, g + 1, 4) if g % b == 0]
