"""Hidden states between two decoder layers during calibration: in RAM, or spilled to a file.

nsamples × seqlen × hidden values per buffer, two buffers (a layer's inputs and outputs): 17 GB in
bf16 for a 70B model at the paper's 128 × 4096 tokens. Below the budget they stay in RAM; above it
each sample lives in a file of the work directory and is read back one sample at a time into a
fresh tensor, so resident memory holds one sample, not the buffer (a long-lived memory map would
keep every page it touched resident). ``dtype`` float32 keeps statistics exact; the model's dtype
halves the bytes for bf16/fp16 models, at the cost of rounding the hidden states once per layer.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch


class Activations:
    """``n`` tensors of one shape and dtype, indexed like a list."""

    def __init__(self, n: int, shape: tuple[int, ...], dtype: torch.dtype, path: Path | None = None):
        self.n, self.shape, self.dtype, self.path = n, tuple(shape), dtype, path
        self.nbytes = torch.Size(self.shape).numel() * dtype.itemsize
        self._ram: list[torch.Tensor | None] | None = None if path else [None] * n
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(self.nbytes * n)

    def __len__(self) -> int:
        return self.n

    def __setitem__(self, i: int, t: torch.Tensor) -> None:
        t = t.detach().to("cpu", self.dtype).reshape(self.shape).contiguous()
        if self._ram is not None:
            self._ram[i] = t
            return
        with open(self.path, "r+b") as f:
            f.seek(i * self.nbytes)
            f.write(memoryview(t.view(torch.uint8).numpy()).cast("B"))

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._ram is not None:
            return self._ram[i]
        out = torch.empty(self.shape, dtype=self.dtype)
        with open(self.path, "rb") as f:
            f.seek(i * self.nbytes)
            f.readinto(memoryview(out.view(torch.uint8).numpy()).cast("B"))
        return out

    def close(self) -> None:
        """Drop the buffer (and the file it spilled to)."""
        self._ram = None if self._ram is None else [None] * self.n
        if self.path:
            self.path.unlink(missing_ok=True)


def available_memory() -> int:
    """Bytes the kernel says a new allocation can get without swapping."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def spill(mode: str, buffer_bytes: int) -> bool:
    """Whether the two activation buffers go to disk: ``disk`` always, ``ram`` never, ``auto`` when the two
    would take more than a quarter of the available memory (the layer, the statistics and the solves need
    the rest)."""
    return mode == "disk" or (mode == "auto" and 2 * buffer_bytes > available_memory() // 4)
