"""The output checkpoint, written from the work directory one decoder layer at a time.

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


def write_output(out_dir: Path, overwrite: bool, model_dir: Path, layer_names: list[str],
                 layer_results: Callable[[int], list[dict]], replaced: set[str], dtype: torch.dtype,
                 publish: Callable) -> Path:
    """Write shard by shard; ``layer_results(i)`` loads decoder layer i's finished jobs ({"names", "parts"}),
    ``replaced`` names the source tensors they stand for (a compressed linear's bias keeps its name and is
    copied like any other tensor), ``publish(writer)`` finishes the directory."""
    files = source_files(model_dir)

    def layer_of(name: str) -> int | None:
        return next((i for i, p in enumerate(layer_names) if name.startswith(p + ".")), None)

    groups: dict[int | None, list[str]] = {}
    for nm in files:
        if nm not in replaced:
            groups.setdefault(layer_of(nm), []).append(nm)
    with CheckpointWriter(out_dir, len(layer_names) + 1, overwrite) as w:
        for shard, i in enumerate([None, *range(len(layer_names))]):
            tensors = read_tensors(files, groups.get(i, []), dtype)
            for saved in layer_results(i) if i is not None else []:
                for name, part in zip(saved["names"], saved["parts"]):
                    tensors.update(packed_layer_tensors(name, part["values"], part["bitmask"], part["b_in"],
                                                        part["b_out"], dtype=dtype))
            w.write(shard, tensors)
        return publish(w)
