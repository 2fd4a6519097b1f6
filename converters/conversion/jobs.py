"""The unit of work the executors run: one solve, from its inputs to compressed tensors.

A job is one linear, or several that read the same input and share one B_in. ``solve`` is a plain
function of a ``SolveTask`` so that any executor (this process, a process pool, a Ray worker on
another machine) can run it; its result is deterministic given the task (seed included), which is
what lets a resumed or retried run reproduce the same checkpoint.
"""
from __future__ import annotations

import dataclasses
import time
import zlib
from dataclasses import dataclass

import torch

from armor_vllm.format import mask_24, pack_24

from .methods import CompressedLayer, LayerStats, MethodOptions, get_method
from .methods.quantize import quantize_layer
from converters.progress import progress


@dataclass
class Job:
    """One solve: a linear, or several that read the same input and share one B_in."""
    layer: int
    names: list[str]

    @property
    def key(self) -> str:
        return self.names[0] if len(self.names) == 1 else self.names[0] + "+" + "+".join(n.rsplit(".", 1)[-1] for n in self.names[1:])


@dataclass
class SolveTask:
    """Everything one solve reads; executors may set ``device`` and ``threads`` for where it runs."""
    method: str
    options: MethodOptions
    weights: list[torch.Tensor]     # the job's source weights, concatenated along N for the solve
    stats: LayerStats
    scheme: str = "none"            # kept values: model dtype ("none") or int8 per output row ("W8A16")
    device: str = "cpu"
    threads: int = 0                # torch threads for the solve (0: leave the process's setting)
    show_iters: bool = False        # a per-iteration progress bar (in the main process only)


def job_options(options: MethodOptions, seed: int, job: Job) -> MethodOptions:
    """Per-job seed derived from the layer name: results don't depend on scheduling order."""
    return dataclasses.replace(options, seed=seed + zlib.crc32(job.key.encode()) % 2**31)


def solve(task: SolveTask) -> tuple[list[dict], dict]:
    """Run one job; returns per-linear compressed tensors (values, bitmask, scale, blocks) and the job record.

    With scheme W8A16 the kept values are quantized after the solve and the blocks re-solved around them
    (:mod:`.methods.quantize`); the record adds the proxy loss right after rounding and after the re-solve."""
    if task.threads:
        torch.set_num_threads(task.threads)
    t0 = time.perf_counter()
    w = torch.cat(task.weights).to(task.device, torch.float32)
    st = task.stats
    st = LayerStats(st.h.to(task.device), st.xtx.to(task.device) if st.xtx is not None else None, st.ntokens)
    iters = getattr(task.options, "iters", 0)
    bar = progress(total=iters, desc="  iterations", unit="it", inner=True) if task.show_iters and iters else None
    res: CompressedLayer = get_method(task.method)(w, st, task.options, (lambda it, loss: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    record = {"loss_start": res.loss_start, "loss_end": res.loss_end, "iters": res.iters}
    core, scale, kept = res.weight, None, res.weight  # kept: the solve's S, whose zeros say which positions it kept
    if task.scheme == "W8A16":
        res, q, record["loss_quant_start"], record["loss_quant_end"] = quantize_layer(w, st.h, res)
        core, scale = q.codes, q.scale
    elif task.scheme != "none":
        raise ValueError(f"scheme {task.scheme!r}: expected none or W8A16")
    parts, row = [], 0
    b = res.b_out.shape[-1] if res.b_out is not None else None
    for wi in task.weights:
        n = wi.shape[0]
        values, bitmask = pack_24(core[row:row + n].cpu(), mask_24(kept[row:row + n].cpu()))  # no dense S in the work dir
        parts.append({"values": values, "bitmask": bitmask,
                      "scale": scale[row:row + n].cpu() if scale is not None else None,
                      "b_in": res.b_in.cpu() if res.b_in is not None else None,
                      "b_out": res.b_out[row // b:(row + n) // b].cpu() if b else None})
        row += n
    record.update(seconds=time.perf_counter() - t0, history=res.history)
    return parts, record
