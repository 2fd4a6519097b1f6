"""The schedule of a conversion: the calibration pass, the solves and the output shards, layer by layer.

Dense calibration: every layer's statistics come from the dense model's activations, so layer i+1
is calibrated while layer i's solves run on the executor; at most twice its slots of solves wait
in the queue, so memory stays bounded. Sequential calibration: layer i+1's statistics come from
the outputs of the compressed layer i, so layer i's solves must all finish, then the layer runs
again with its compressed weights (SparseGPT's reference order); parallelism is capped at one
layer's jobs. Refinement (``--refine block``, :mod:`.refine`) tunes a layer once all its solves are in,
in this process on ``--device`` (it reads the activation buffers the pass holds), so like sequential
calibration it waits for each layer's solves. A layer's output shard is written as soon as its last
solve (and, with refinement, the layer's refinement) is in.

Everything a run finishes is in the work directory (statistics, solves, refined layers, shards), so a
run killed at any point resumes where it stopped, whichever executor ran the solves.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import time

import torch

from armor_vllm.format import reconstruct

from .activations import Activations, spill
from .calibration import capture_layer_inputs, collect_layer_stats, run_layer
from .executors import Executor
from .jobs import Job, SolveTask, job_options, solve
from .loader import LayerLoader, release_memory
from .methods import LayerStats
from .refine import refine_layer
from converters.progress import progress
from .workdir import WorkDir, atomic_save
from .writer import OutputWriter


def layer_jobs(i: int, names: list[str], groups: list[list[str]] | None) -> list[Job]:
    """Jobs of decoder layer i: one per linear, or one per input-sharing group (shared input transform)."""
    if not groups:
        return [Job(i, [n]) for n in names]
    short = {n.rsplit(f".{i}.", 1)[-1]: n for n in names}
    return [Job(i, members) for g in groups if (members := [short[s] for s in g if s in short])]


class Pipeline:
    def __init__(self, cfg, work: WorkDir, loader: LayerLoader, targets: dict, executor: Executor,
                 output: OutputWriter):
        self.cfg, self.work, self.loader, self.targets, self.ex, self.output = cfg, work, loader, targets, executor, output
        self.target_layers = sorted({i for i, _ in targets.values()})
        self.jobs: dict[int, list[Job]] = {}
        self.pending: dict[cf.Future, Job] = {}
        self.planned = False
        self.bar = progress(total=len(targets), desc="linears", unit="linear")

    # ------------------------------------------------------------ solves
    def names(self, i: int) -> list[str]:
        return [n for n, (li, _) in self.targets.items() if li == i]

    def finished(self, job: Job) -> bool:
        return self.work.result_path(job.key).is_file()

    def task(self, job: Job, stats: dict[str, LayerStats]) -> SolveTask:
        st = stats[job.names[0].rsplit(f".{job.layer}.", 1)[-1]]
        if not self.cfg.need_xtx:
            st = dataclasses.replace(st, xtx=None)
        return SolveTask(self.cfg.method, job_options(self.cfg.options, self.cfg.seed, job),
                         self.loader.weights([f"{n}.weight" for n in job.names]), st, scheme=self.cfg.scheme)

    def submit_layer(self, i: int, stats: dict[str, LayerStats], groups: list[list[str]]) -> None:
        self.jobs[i] = layer_jobs(i, self.names(i), groups if self.cfg.shared_input_transform else None)
        done = [j for j in self.jobs[i] if self.finished(j)]
        if done:
            self.bar.update(sum(len(j.names) for j in done), note=f"layer {i}: {len(done)} jobs done by an earlier run")
        for job in self.jobs[i]:
            if not self.finished(job):
                if not self.planned:
                    self.plan(self.jobs[i], stats)
                self.wait(2 * self.ex.slots - 1)
                self.pending[self.ex.submit(solve, self.task(job, stats))] = job
        self.layer_done(i)

    def wait(self, at_most: int) -> None:
        """Collect finished solves until at most ``at_most`` are pending."""
        while len(self.pending) > at_most:
            done, _ = cf.wait(self.pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                job = self.pending.pop(fut)
                parts, record = fut.result()
                self.work.record_path(job.key).write_text(json.dumps(record))  # before the result: it marks done
                atomic_save({"names": job.names, "parts": parts}, self.work.result_path(job.key))
                self.bar.update(len(job.names), note=f"{job.key}: proxy loss {record['loss_start']:.4f} -> "
                                f"{record['loss_end']:.4f} ({record['iters']} it, {record['seconds']:.1f} s)")
                self.layer_done(job.layer)

    def layer_done(self, i: int) -> None:
        """Write layer i's shard once all of its jobs are in."""
        jobs = self.jobs.get(i, [])
        if jobs and not self.output.layer_written(i) and all(self.finished(j) for j in jobs) \
                and not any(j.layer == i for j in self.pending.values()) \
                and (not self.cfg.refine.on or self.work.refined_path(i).is_file()):
            self.output.write_layer(i, self.results(i))
            release_memory()

    def results(self, i: int) -> list[dict]:
        """Layer i's compressed linears: refined if refinement is on, else as the solves left them."""
        if self.cfg.refine.on:
            return torch.load(self.work.refined_path(i))["results"]
        return [torch.load(self.work.result_path(j.key)) for j in self.jobs[i]]

    # ------------------------------------------------------------ the plan
    def plan(self, jobs: list[Job], stats: dict[str, LayerStats]) -> None:
        """Time one job of each shape in this layer (a 1- and a 3-iteration trial give setup and per-iteration
        cost) and print what the whole run will take; later layers are assumed alike, as in Llama and Qwen."""
        self.planned = True
        cfg = self.cfg
        iters = getattr(cfg.options, "iters", None)
        seconds: dict[tuple[int, int], float] = {}
        for job in jobs:
            t = self.task(job, stats)
            shape = (sum(w.shape[0] for w in t.weights), t.weights[0].shape[1])
            if shape in seconds:
                continue

            def trial(n_iters: int) -> float:
                opts = dataclasses.replace(t.options, iters=n_iters, patience=10**9) if iters else t.options
                t0 = time.perf_counter()
                solve(dataclasses.replace(t, options=opts, device=cfg.device))
                return time.perf_counter() - t0

            one = trial(1)
            if iters:
                per_iter = max(0.0, (trial(3) - one) / 2)
                one = max(0.0, one - per_iter) + per_iter * iters
            seconds[shape] = one
        counts: dict[tuple[int, int], int] = {}
        for job in jobs:
            shape = (sum(self.targets[n][1].weight.shape[0] for n in job.names), self.targets[job.names[0]][1].weight.shape[1])
            counts[shape] = counts.get(shape, 0) + len(self.target_layers)
        est = sum(seconds[s] * c for s, c in counts.items()) / self.ex.slots
        print(f"plan: {cfg.method} on {len(self.targets)} linears in {len(self.target_layers)} decoder layers, "
              f"{sum(counts.values())} jobs, block size {cfg.block_size or '-'}, device {cfg.device}, "
              f"executor {cfg.executor} ({self.ex.slots} at a time), {cfg.calibration} calibration")
        for (n, k), c in sorted(counts.items()):
            print(f"  {c:4d} × [{n} × {k}]  ~{seconds[(n, k)]:.1f} s each")
        print(f"  estimated solve time: {est / 60:.1f} min")

    # ------------------------------------------------------------ calibration
    def stats(self, i: int) -> tuple[dict[str, LayerStats], list[list[str]]]:
        saved = torch.load(self.work.stats_path(i))
        return {n: LayerStats(**s) for n, s in saved["stats"].items()}, saved["groups"]

    def compressed(self, i: int, layer: torch.nn.Module) -> None:
        """Give decoder layer i its compressed weights, for the sequential pass to run it again."""
        prefix = self.loader.layer_names[i] + "."
        for saved in self.results(i):
            for name, part in zip(saved["names"], saved["parts"]):
                lin = layer.get_submodule(name.removeprefix(prefix))
                lin.weight.data = reconstruct(part["values"], part["bitmask"], part["b_in"], part["b_out"],
                                              part.get("scale")).to(lin.weight.dtype)

    def buffer(self, name: str, shape: tuple[int, ...]) -> Activations:
        cfg = self.cfg
        dtype = torch.float32 if cfg.activation_dtype == "float32" else next(self.loader.model.parameters()).dtype
        to_disk = spill(cfg.activations, cfg.nsamples * torch.Size(shape).numel() * dtype.itemsize)
        return Activations(cfg.nsamples, shape, dtype, self.work.activations_dir / f"{name}.bin" if to_disk else None)

    def calibrate(self, samples: torch.Tensor) -> None:
        """The layer-by-layer pass over every decoder layer up to the last target, solves submitted on the way.

        Up to two streams of hidden states run through the layers: the dense model's, and the compressed
        model's (the compressed layers so far, refined where refinement is on). Statistics come from the one
        ``--calibration`` names; refinement reads the pair its ``inputs`` name."""
        cfg, loader, refine = self.cfg, self.loader, self.cfg.refine
        sequential = cfg.calibration == "sequential"
        need_dense = not sequential or (refine.on and refine.inputs in ("dense", "mixed"))
        need_comp = sequential or (refine.on and refine.inputs in ("sequential", "mixed"))
        inputs, layer_kwargs = capture_layer_inputs(loader.model, samples, cfg.device,
                                                    lambda shape: self.buffer("layer_0000", shape))
        loader.free_embeddings()
        dense_in, comp_in = (inputs if need_dense else None), (inputs if need_comp else None)
        for i in progress(range(1 + self.target_layers[-1]), desc="calibration", unit="layer"):
            layer = loader.load_layer(i)
            target = i in self.target_layers
            stats_in = comp_in if sequential else dense_in
            stats_out = self.buffer(f"layer_{i + 1:04d}", inputs.shape)  # the dense layer on stats_in
            stats, groups = collect_layer_stats(layer, stats_in, layer_kwargs, cfg.device, cfg.need_xtx, stats_out)
            if not self.work.stats_path(i).is_file():  # a resumed refinement pass keeps the saved ones
                atomic_save({"stats": {n: dataclasses.asdict(s) for n, s in stats.items()}, "groups": groups},
                            self.work.stats_path(i))
            dense_out = stats_out if not sequential else self.run_dense(layer, dense_in, layer_kwargs, i) if need_dense else None
            if not need_comp and not (refine.on and target):
                loader.free_layer(i)  # its outputs are in: the solves read their weights from the shards
            if target:
                self.submit_layer(i, stats, groups)
            if target and (need_comp or refine.on):
                self.wait(0)
            if target and refine.on:
                pairs = {"dense": (dense_in, dense_out), "mixed": (comp_in, dense_out),
                         "sequential": (comp_in, stats_out if sequential else None)}
                x, y = pairs[refine.inputs]
                self.refine(i, layer, x, y if y is not None else self.run_dense(layer, comp_in, layer_kwargs, i, "target"),
                            layer_kwargs)
            comp_out = None
            if need_comp:
                if target:
                    self.compressed(i, layer)
                comp_out = self.buffer(f"comp_{i + 1:04d}", inputs.shape)
                run_layer(layer, comp_in, layer_kwargs, cfg.device, comp_out)
            loader.free_layer(i)
            keep = {id(dense_out), id(comp_out)}
            for buf in {id(b): b for b in (dense_in, comp_in, stats_out) if b is not None}.values():
                if id(buf) not in keep:
                    buf.close()
            dense_in, comp_in = dense_out, comp_out
        for buf in {id(b): b for b in (dense_in, comp_in) if b is not None}.values():
            buf.close()

    def run_dense(self, layer: torch.nn.Module, inputs: Activations, layer_kwargs: dict, i: int,
                  name: str = "dense") -> Activations:
        """The dense layer over ``inputs`` (its weights: ``compressed`` has not replaced them yet)."""
        out = self.buffer(f"{name}_{i + 1:04d}", inputs.shape)
        run_layer(layer, inputs, layer_kwargs, self.cfg.device, out)
        return out

    # ------------------------------------------------------------ refinement
    def refine(self, i: int, layer: torch.nn.Module, inputs: Activations, targets: Activations,
               layer_kwargs: dict) -> None:
        """Refine decoder layer i against ``targets`` (refine.refine_layer) unless an earlier run did; then its
        shard can be written."""
        path = self.work.refined_path(i)
        if not path.is_file():
            results = [torch.load(self.work.result_path(j.key)) for j in self.jobs[i]]
            tuned, record = refine_layer(layer, self.loader.layer_names[i] + ".", results, inputs, targets,
                                         layer_kwargs, self.cfg.refine, self.cfg.seed + i, self.cfg.device)
            atomic_save({"results": tuned, "record": record}, path)
            print(f"layer {i}: refined, output error on held-back samples {record['held_error_start']:.4f} -> "
                  f"{record['held_error_end']:.4f} (best at step {record['best_step']} of {record['steps']}, "
                  f"{record['seconds']:.1f} s)", flush=True)
        self.layer_done(i)

    def run(self, samples: torch.Tensor) -> None:
        """Calibrate (unless every layer's statistics are saved and nothing needs the pass's activations),
        solve, refine, and write every shard."""
        saved = all(self.work.stats_path(i).is_file() for i in range(1 + self.target_layers[-1]))
        if saved and not self.cfg.refine.on:
            print(f"calibration: reusing statistics in {self.work.stats_dir}")
            for i in self.target_layers:
                self.submit_layer(i, *self.stats(i))
        else:
            self.calibrate(samples)
        self.wait(0)
        self.bar.close()
        for i in self.output.missing_layers():  # the layers left dense
            self.output.write_layer(i, self.results(i) if i in self.jobs else [])
        self.output.write_layer(None, [])  # embeddings; final norm and lm_head

    def refine_records(self) -> list[dict]:
        """The refinement report of every refined layer, in order (mapped, not read: only the record is used)."""
        return [{"layer": i, **torch.load(self.work.refined_path(i), mmap=True)["record"]}
                for i in sorted(self.jobs) if self.work.refined_path(i).is_file()]

    def records(self) -> list[dict]:
        """The report of every job, in layer order."""
        return [{"job": j.key, "names": j.names, "method": self.cfg.method, "block_size": self.cfg.block_size,
                 **json.loads(self.work.record_path(j.key).read_text())}
                for i in sorted(self.jobs) for j in self.jobs[i]]
