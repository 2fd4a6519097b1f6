"""The source model without its weights, filled one decoder layer at a time from its safetensors shards.

The skeleton is built under accelerate's ``init_empty_weights``: parameters live on the meta device
and cost nothing, buffers such as the rotary ``inv_freq`` (computed in ``__init__``, absent from
checkpoints) stay real. The input embeddings are read for the first forward pass and dropped after
it (lm_head is never read: the writer copies it from the shards); each decoder layer is read when its
turn comes and dropped back to meta after it.
Shards are opened per read and closed, so memory never grows with the model.
:func:`source_identity` says which model a directory holds, for resuming only with the same one.
"""
from __future__ import annotations

import ctypes
import fnmatch
import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from armor_vllm.format import config_dtype, read_tensors, safetensors_files

from .calibration import decoder_layer_names

SAMPLE_BYTES = 4096  # read at each end of every tensor's data for the identity
# The tokenizer's files in a HF model directory (they fix the calibration tokens, and serving needs them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "*.tiktoken", "tekken.json")


def listed(name: str, patterns: tuple[str, ...]) -> bool:
    """A file name matches one of the glob patterns, case-insensitively (LICENSE, License.txt)."""
    return any(fnmatch.fnmatchcase(name.lower(), p.lower()) for p in patterns)


def source_identity(model_dir: Path) -> dict[str, str]:
    """What the results depend on in the source, as short hashes keyed by what they cover
    ("model.safetensors: header", "model.safetensors: tensor values", "config.json", tokenizer files).

    Content only, no mtimes or paths: a copy made without `cp -p`, or moved elsewhere, is the same model.
    Cheap at any size: per weight file its safetensors header (every tensor's name, dtype, shape and
    offsets) and the first and last 4 KiB of every tensor's bytes (a fine-tune saved over the original
    keeps the header), about 8 KiB read per tensor; config.json and the tokenizer files (they fix the
    calibration tokens) whole. A change confined to the middle of a tensor goes unseen.
    """
    out = {}
    for f in sorted(set(safetensors_files(model_dir).values())):
        out[f"{f}: header"], out[f"{f}: tensor values"] = _safetensors_digests(model_dir / f)
    for f in sorted(model_dir.iterdir()):
        if f.is_file() and (f.name == "config.json" or listed(f.name, TOKENIZER_FILES)):
            out[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return out


def _safetensors_digests(path: Path) -> tuple[str, str]:
    """(hash of the header, hash of both ends of every tensor's bytes) of one safetensors file."""
    values = hashlib.sha256()
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = fh.read(size)
        spans = sorted(e["data_offsets"] for k, e in json.loads(header).items() if k != "__metadata__")
        for begin, end in spans:
            for start in sorted({begin, max(begin, end - SAMPLE_BYTES)}):
                fh.seek(8 + size + start)
                values.update(fh.read(min(SAMPLE_BYTES, end - start)))
    return hashlib.sha256(header).hexdigest()[:16], values.hexdigest()[:16]


class LayerLoader:
    def __init__(self, model_dir: Path):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = model_dir
        self.files = safetensors_files(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        dtype = config_dtype(json.loads((model_dir / "config.json").read_text()))
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        self.layer_names = decoder_layer_names(self.model)
        names = {id(m): n for n, m in self.model.named_modules()}
        head = names[id(self.model.get_output_embeddings())]  # never run: the writer copies it from the shards
        self._fill(self.model, "", skip=tuple(n + "." for n in [*self.layer_names, head]))

    def _fill(self, module: nn.Module, prefix: str, skip: tuple[str, ...] = ()) -> None:
        """Read every meta parameter of ``module`` (named ``prefix`` in the checkpoint) from the shards."""
        want = {f"{prefix}{n}": n for n, p in module.named_parameters() if p.is_meta
                and not f"{prefix}{n}".startswith(skip)}
        present = [n for n in want if n in self.files]
        if present:
            dtype = next(p.dtype for p in module.parameters())
            tensors = read_tensors(self.model_dir, self.files, present, dtype)
            module.load_state_dict({want[n]: t for n, t in tensors.items()}, strict=False, assign=True)

    def weights(self, names: list[str]) -> list[torch.Tensor]:
        """Source tensors by checkpoint name, read now (a solve's W), in the model's dtype."""
        missing = [n for n in names if n not in self.files]
        if missing:
            raise FileNotFoundError(f"{self.model_dir}: tensor {missing[0]} is in no safetensors shard")
        dtype = next(self.model.parameters()).dtype
        t = read_tensors(self.model_dir, self.files, names, dtype)
        return [t[n] for n in names]

    def load_layer(self, i: int) -> nn.Module:
        layer = self.model.get_submodule(self.layer_names[i])
        self._fill(layer, self.layer_names[i] + ".")
        meta = [n for n, p in layer.named_parameters() if p.is_meta]
        if meta:
            raise FileNotFoundError(f"{self.model_dir}: {self.layer_names[i]}.{meta[0]} is in no safetensors shard")
        return layer

    def free_layer(self, i: int) -> None:
        self.model.get_submodule(self.layer_names[i]).to("meta")
        release_memory()

    def free_embeddings(self) -> None:
        """Once decoder layer 0's inputs are captured, the input embeddings are not needed again."""
        self.model.get_input_embeddings().to("meta")
        release_memory()


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and a streamed conversion's
    resident memory would creep up layer after layer to far more than it holds); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
