"""Reading and writing checkpoint directories: safetensors shards, the index, atomic publication."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .schema import INDEX_FILE, MAX_SHARD_BYTES, SUFFIXES, ArmorFormatError, ArmorQuantizationConfig
from .tensors import mask_24, pack_24, reconstruct
from .validate import compressed_prefixes, fail, validate_layer


def config_dtype(config: dict) -> torch.dtype:
    """The weights' dtype a HF config.json names (``torch_dtype``, or ``dtype`` as transformers 4.56+
    writes it; float32 when it names neither)."""
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
    return getattr(torch, name, torch.float32)


@dataclass
class ArmorCheckpoint:
    path: Path
    config: dict                               # config.json
    qcfg: ArmorQuantizationConfig
    tensor_files: dict[str, str]               # tensor name -> shard file name

    @property
    def dtype(self) -> torch.dtype:
        return config_dtype(self.config)

    def layer_prefixes(self) -> list[str]:
        return compressed_prefixes(self.tensor_files)

    def load(self, names) -> dict[str, torch.Tensor]:
        return read_tensors(self.path, self.tensor_files, names)

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
            sd[f"{p}.weight"] = reconstruct(t["weight_values"], t["weight_bitmask"], t.get("b_in"), t.get("b_out"),
                                            t.get("weight_scale"))
            if "bias" in t:
                sd[f"{p}.bias"] = t["bias"]
        return sd

    def validate(self) -> None:
        """Check every compressed layer, and that no linear is stored both dense and compressed."""
        for p in self.layer_prefixes():
            files = {s: self.tensor_files.get(f"{p}.{s}", "") for s in SUFFIXES}
            validate_layer(p, self.layer(p), self.qcfg, self.dtype, files)
            if f"{p}.weight" in self.tensor_files:
                fail(self.tensor_files[f"{p}.weight"], f"{p}.weight",
                      "extra tensor: a compressed layer stores weight_values/weight_bitmask, not a dense weight")


def safetensors_files(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> shard file name of a safetensors model directory (dense or ARMOR).

    From the index where there is one, else from the headers of its ``*.safetensors`` files. Every shard
    is opened, so a missing or truncated one, or an index that disagrees with its shards, fails here with
    the file and tensor named rather than half-way through a load.
    """
    path = Path(path)
    index = path / INDEX_FILE
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    shards = sorted(set(weight_map.values())) or sorted(f.name for f in path.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{path}: no *.safetensors weights and no {INDEX_FILE} "
                                "(only safetensors checkpoints are supported)")
    tensor_files: dict[str, str] = {}
    for f in shards:
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f}: listed in {INDEX_FILE} but missing")
        try:
            with safe_open(path / f, framework="pt") as fh:
                names = list(fh.keys())
        except (SafetensorError, OSError) as e:
            raise ArmorFormatError(f"{path / f}: unreadable safetensors file ({e}); is it truncated?") from None
        for nm in names:
            if weight_map and weight_map.get(nm) != f:
                fail(f, nm, f"extra tensor: not listed for this shard in {INDEX_FILE}")
            tensor_files[nm] = f
    for nm, f in weight_map.items():
        if nm not in tensor_files:
            fail(f, nm, f"missing: listed in {INDEX_FILE} but absent from the shard")
    return tensor_files


def read_tensors(path: str | os.PathLike, tensor_files: dict[str, str], names, dtype: torch.dtype | None = None
                 ) -> dict[str, torch.Tensor]:
    """Named tensors of a safetensors directory, each shard opened once; floating ones cast to ``dtype`` if given."""
    by_file: dict[str, list[str]] = {}
    for nm in names:
        by_file.setdefault(tensor_files[nm], []).append(nm)
    out = {}
    for f, nms in by_file.items():
        with safe_open(Path(path) / f, framework="pt") as fh:
            for nm in nms:
                t = fh.get_tensor(nm)
                out[nm] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


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
    tensor_files = safetensors_files(path)
    ckpt = ArmorCheckpoint(path, config, qcfg, tensor_files)
    if validate:
        ckpt.validate()
    return ckpt


def layer_tensors(prefix: str, weight: torch.Tensor, b_in=None, b_out=None, bias=None,
                  mask: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                  scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of one compressed linear (S given dense, zeros at pruned positions; int8 with ``scale``)."""
    values, bitmask = pack_24(weight, mask_24(weight) if mask is None else mask)
    return packed_layer_tensors(prefix, values, bitmask, b_in, b_out, bias, dtype, scale)


def packed_layer_tensors(prefix: str, values: torch.Tensor, bitmask: torch.Tensor, b_in=None, b_out=None, bias=None,
                         dtype: torch.dtype | None = None, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of one compressed linear whose S is already packed (values, bitmask).

    int8 values (W8A16) are stored as they are, with ``scale`` (one per row) as ``weight_scale`` [N, 1] in
    ``dtype``; floating values are cast to ``dtype``."""
    if (scale is None) != values.is_floating_point():
        raise ArmorFormatError(f"{prefix}.weight_values: {values.dtype} values "
                               f"{'need' if scale is None else 'take no'} weight_scale")
    dtype = dtype or (values.dtype if scale is None else scale.dtype)
    out = {f"{prefix}.weight_values": values.to(dtype) if scale is None else values,
           f"{prefix}.weight_bitmask": bitmask}
    for s, t in (("weight_scale", None if scale is None else scale.reshape(-1, 1)), ("b_in", b_in), ("b_out", b_out),
                 ("bias", bias)):
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
        cur[nm], size = t, size + nbytes
    return shards + [cur] if cur else shards


_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriter:
    """A checkpoint written shard by shard (one per decoder layer as it finishes) and published atomically.

    Shards go to a temp directory beside ``out_dir`` and are fsynced as they are written, so only one
    shard's tensors need be in memory. :meth:`publish` writes config, extras and the index last,
    validates, and renames the directory into place: a crash at any point leaves either the old
    directory or none, never a partial one. Used as a context manager, an exception removes the temp
    dir — unless the caller named one (``tmp``): a resumable run keeps its finished shards there, each
    renamed into place only once complete, and asks :meth:`has` before writing one again.
    """

    def __init__(self, out_dir: str | os.PathLike, n_shards: int, overwrite: bool = False,
                 tmp: str | os.PathLike | None = None):
        self.out, self.n = Path(out_dir), n_shards
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out}: already exists (pass overwrite=True / --overwrite to replace it)")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.resumable = tmp is not None
        if tmp is not None:
            self.tmp = Path(tmp)
            self.tmp.mkdir(parents=True, exist_ok=True)
        else:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=self.out.parent))
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self.resumable:
            self.abort()

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _name(self, i: int) -> str:
        return f"model-{i + 1:05d}-of-{self.n:05d}.safetensors"

    def _register(self, fname: str, sizes: dict[str, int]) -> None:
        for nm, size in sizes.items():
            self.weight_map[nm] = fname
            self.total += size

    def has(self, i: int) -> bool:
        """Whether shard i was finished by an earlier run (then it counts as written)."""
        fname = self._name(i)
        if not (self.tmp / fname).is_file():
            return False
        sizes = {}
        with safe_open(self.tmp / fname, framework="pt") as f:
            for nm in f.keys():
                sl = f.get_slice(nm)
                sizes[nm] = torch.Size(sl.get_shape()).numel() * _DTYPE_BYTES[sl.get_dtype()]
        self._register(fname, sizes)
        return True

    def write(self, i: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write shard i (0-based) of n: to a temp name, fsynced, then renamed, so a shard file is whole."""
        fname = self._name(i)
        part = self.tmp / (fname + ".part")
        save_file({nm: t.contiguous() for nm, t in tensors.items()}, part, metadata={"format": "pt"})
        _fsync(part)
        os.replace(part, self.tmp / fname)
        self._register(fname, {nm: t.numel() * t.element_size() for nm, t in tensors.items()})

    def publish(self, hf_config: dict, qcfg: ArmorQuantizationConfig,
                save_extras: Callable[[Path], None] | None = None) -> Path:
        """``save_extras(tmp_dir)`` writes tokenizer files, generation_config.json and the like."""
        for part in self.tmp.glob("*.part"):  # a shard a killed run was writing
            part.unlink()
        if save_extras is not None:
            save_extras(self.tmp)
        config = dict(hf_config)
        config["quantization_config"] = qcfg.to_dict()
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        index = self.tmp / INDEX_FILE
        index.write_text(json.dumps({"metadata": {"total_size": self.total}, "weight_map": self.weight_map}, indent=2))
        _fsync(index)
        read_checkpoint(self.tmp, validate=True)
        apply_umask(self.tmp)
        _fsync(self.tmp)
        if self.out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            os.replace(self.out, trash / self.out.name)
            os.replace(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        _fsync(self.out.parent)
        return self.out


def write_checkpoint(out_dir: str | os.PathLike, tensors: dict[str, torch.Tensor], hf_config: dict,
                     qcfg: ArmorQuantizationConfig, save_extras: Callable[[Path], None] | None = None,
                     overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write a validated checkpoint held in memory atomically (see :class:`CheckpointWriter`)."""
    shards = _shards(tensors, max_shard_bytes)
    with CheckpointWriter(out_dir, len(shards), overwrite) as w:
        for i, shard in enumerate(shards):
            w.write(i, shard)
        return w.publish(hf_config, qcfg, save_extras)


def apply_umask(directory: Path) -> None:
    """Give a finished temp directory the modes of any new file: mkdtemp makes it 0700, safetensors 0600."""
    mask = os.umask(0)
    os.umask(mask)
    directory.chmod(0o777 & ~mask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)


def weight_bytes(model_dir: str | os.PathLike) -> int:
    """Bytes of a model directory's safetensors shards (dense or ARMOR): its size on disk."""
    return sum((Path(model_dir) / f).stat().st_size for f in set(safetensors_files(model_dir).values()))
