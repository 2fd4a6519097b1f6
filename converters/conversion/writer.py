"""The output checkpoint, written one decoder layer at a time as its solves finish.

Shard 1 holds the input embeddings, shard i+2 decoder layer i: its compressed linears from the
finished jobs and its other tensors (norms) read straight from the source shards, the last shard
the final norm and lm_head; each is read, with the source handles closed after it. Only one shard's
tensors are in memory at any time; the checkpoint is published atomically at the end.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from armor_vllm.format import CheckpointWriter, packed_layer_tensors, read_tensors, safetensors_files

from .loader import TOKENIZER_FILES

# What the output takes from the source directory beside its own weights and config.json: what loading,
# chatting and redistributing need. An allow-list, so the source's other weights (pytorch_model.bin,
# consolidated.pth, *.gguf, …) never end up beside ours.
CHECKPOINT_EXTRAS = ("generation_config.json", *TOKENIZER_FILES, "chat_template.jinja", "chat_template.json",
                     "*preprocessor_config.json", "processor_config.json", "LICENSE*", "README*", "*.md")


class OutputWriter:
    """The output checkpoint: shard 1 the input embeddings, shard i+2 decoder layer i, the last shard the rest
    (final norm, lm_head).

    ``replaced`` names the source tensors the compressed linears stand for (a compressed linear's bias
    keeps its name and is copied like any other tensor). With ``tmp`` (a directory that survives the
    run, in the work directory) shards an earlier run finished are kept and not written again.
    """

    def __init__(self, out_dir: Path, overwrite: bool, model_dir: Path, layer_names: list[str], embeddings: str,
                 replaced: set[str], dtype: torch.dtype, tmp: Path | None):
        self.model_dir, self.files = model_dir, safetensors_files(model_dir)
        self.dtype, self.n_layers = dtype, len(layer_names)
        self.groups: dict[int, list[str]] = {}
        for nm in self.files:
            if nm not in replaced:
                i = next((i for i, p in enumerate(layer_names) if nm.startswith(p + ".")), None)
                shard = i + 1 if i is not None else 0 if nm.startswith(embeddings + ".") else self.n_layers + 1
                self.groups.setdefault(shard, []).append(nm)
        self.writer = CheckpointWriter(out_dir, self.n_layers + 2, overwrite, tmp)
        self.done = {s for s in range(self.n_layers + 2) if self.writer.has(s)}

    def write_layer(self, i: int | None, results: list[dict]) -> None:
        """Shard of decoder layer i from its finished jobs ({"names", "parts"}); None: the others, in turn."""
        if i is None:
            for shard in (0, self.n_layers + 1):
                self._write(shard, [])
        else:
            self._write(i + 1, results)

    def _write(self, shard: int, results: list[dict]) -> None:
        if shard in self.done:
            return
        tensors = read_tensors(self.model_dir, self.files, self.groups.get(shard, []), self.dtype)
        for saved in results:
            for name, part in zip(saved["names"], saved["parts"]):
                tensors.update(packed_layer_tensors(name, part["values"], part["bitmask"], part["b_in"],
                                                    part["b_out"], dtype=self.dtype, scale=part.get("scale")))
        self.writer.write(shard, tensors)
        self.done.add(shard)

    def layer_written(self, i: int) -> bool:
        return i + 1 in self.done

    def missing_layers(self) -> list[int]:
        return [s - 1 for s in range(1, self.n_layers + 1) if s not in self.done]

    def publish(self, hf_config: dict, qcfg, save_extras: Callable[[Path], None]) -> Path:
        return self.writer.publish(hf_config, qcfg, save_extras)

    def abort(self) -> None:
        if not self.writer.resumable:
            self.writer.abort()
