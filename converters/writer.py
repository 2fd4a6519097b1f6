"""The output checkpoint, written one decoder layer at a time as its solves finish.

Shard 1 holds everything outside the decoder layers (embeddings, final norm, lm_head), shard i+2
decoder layer i: its compressed linears from the finished jobs and its other tensors (norms)
read straight from the source shards, whose handles close after each layer. Only one layer's
tensors are in memory at any time; the checkpoint is published atomically at the end.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from armor_vllm.format import INDEX_FILE, CheckpointWriter, packed_layer_tensors


def source_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of a HF model directory that holds it."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        return {nm: model_dir / f for nm, f in json.loads(index.read_text())["weight_map"].items()}
    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            out.update(dict.fromkeys(fh.keys(), f))
    return out


def read_tensors(files: dict[str, Path], names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Named source tensors (floating ones cast to the output dtype), each file opened once and closed."""
    by_file: dict[Path, list[str]] = {}
    for nm in names:
        by_file.setdefault(files[nm], []).append(nm)
    out = {}
    for f, nms in by_file.items():
        with safe_open(f, framework="pt") as fh:
            for nm in nms:
                t = fh.get_tensor(nm)
                out[nm] = t.to(dtype) if t.is_floating_point() else t
    return out


class OutputWriter:
    """The output checkpoint: shard 1 the tensors outside the decoder layers, shard i+2 decoder layer i.

    ``replaced`` names the source tensors the compressed linears stand for (a compressed linear's bias
    keeps its name and is copied like any other tensor). With ``tmp`` (a directory that survives the
    run, in the work directory) shards an earlier run finished are kept and not written again.
    """

    def __init__(self, out_dir: Path, overwrite: bool, model_dir: Path, layer_names: list[str],
                 replaced: set[str], dtype: torch.dtype, tmp: Path | None):
        self.files, self.dtype = source_files(model_dir), dtype
        self.groups: dict[int | None, list[str]] = {}
        for nm in self.files:
            if nm not in replaced:
                i = next((i for i, p in enumerate(layer_names) if nm.startswith(p + ".")), None)
                self.groups.setdefault(i, []).append(nm)
        self.writer = CheckpointWriter(out_dir, len(layer_names) + 1, overwrite, tmp)
        self.done = {i for i in range(-1, len(layer_names)) if self.writer.has(i + 1)}
        self.n_layers = len(layer_names)

    def write(self, i: int | None, results: list[dict]) -> None:
        """Shard of decoder layer i (None: the head/tail shard) from its finished jobs ({"names", "parts"})."""
        key = -1 if i is None else i
        if key in self.done:
            return
        tensors = read_tensors(self.files, self.groups.get(i, []), self.dtype)
        for saved in results:
            for name, part in zip(saved["names"], saved["parts"]):
                tensors.update(packed_layer_tensors(name, part["values"], part["bitmask"], part["b_in"],
                                                    part["b_out"], dtype=self.dtype))
        self.writer.write(key + 1, tensors)
        self.done.add(key)

    def missing(self) -> list[int | None]:
        return [None if k == -1 else k for k in range(-1, self.n_layers) if k not in self.done]

    def publish(self, hf_config: dict, qcfg, save_extras: Callable[[Path], None]) -> Path:
        return self.writer.publish(hf_config, qcfg, save_extras)

    def abort(self) -> None:
        if not self.writer.resumable:
            self.writer.abort()
