"""The conversion pipeline: HF dir -> calibration statistics -> per-layer solves -> ARMOR checkpoint.

Orchestration only; the math lives in converters/methods. Everything between steps goes through
a work directory so that a run killed at any point (even SIGKILL) resumes where it stopped and,
with the same seed, produces the same checkpoint: each layer job is deterministic and is saved
atomically once finished.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing as mp
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from armor_vllm.format import INDEX_FILE, ArmorQuantizationConfig, CalibrationRecord, mask_24, overhead_ratio, pack_24

from . import report
from .calibration import calibrate, decoder_layer_names, decoder_layers
from .checks import (check_device, check_disk, check_finite, check_ignore, check_layers, check_paths, check_shapes,
                     check_tokens,
                     disk_needed, matches, read_hf_config)
from .data import calibration_samples
from .loader import LayerLoader
from .methods import CompressedLayer, LayerStats, MethodOptions, get_method, make_options, method_spec
from .progress import progress
from .workdir import WorkDir, atomic_save
from .writer import write_output

# quick/default fit a 2-core CPU for the 135M default model; paper = the authors' protocol.
PRESETS = {
    "quick": dict(nsamples=16, seqlen=512, iters=20),
    "default": dict(nsamples=64, seqlen=512, iters=100),
    "paper": dict(nsamples=128, seqlen=4096, iters=20000, block_size=128, solver="adam", groups_per_tile=1),
}


@dataclass(kw_only=True)
class ConvertConfig:
    """One conversion; checked on construction where no file needs reading."""

    model_dir: Path
    out_dir: Path
    method: str = "armor"
    options: MethodOptions | None = None     # the method's own options (None: its defaults)
    calib: str = "wiki"
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0                            # calibration sampling and per-job solver seeds
    device: str = "cpu"
    workers: int = 1
    shared_input_transform: bool = False
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    layers: list[int] | None = None          # decoder layers to compress (None: all)
    dtype: str | None = None                 # output dtype (None: the source's)
    work_dir: Path | None = None
    stats_dir: Path | None = None            # calibration statistics, shareable between runs
    collect_xtx: bool = False                # also keep XᵀX when the method doesn't need it
    overwrite: bool = False
    keep_work: bool = False
    discard_work: bool = False               # drop a work directory left by a run with other settings

    def __post_init__(self):
        self.model_dir, self.out_dir = Path(self.model_dir), Path(self.out_dir)
        self.work_dir = Path(self.work_dir) if self.work_dir else self.out_dir.with_name(self.out_dir.name + ".armor-work")
        self.stats_dir = Path(self.stats_dir) if self.stats_dir else None
        self.options = self.options or make_options(self.method)
        if type(self.options) is not method_spec(self.method).options:
            raise TypeError(f"options {type(self.options).__name__} do not belong to method {self.method!r}")
        for name in ("nsamples", "seqlen", "workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name} {v}: expected a positive integer")

    @property
    def block_size(self) -> int | None:
        return getattr(self.options, "block_size", None)

    @property
    def need_xtx(self) -> bool:
        return self.collect_xtx or method_spec(self.method).needs_xtx

    def calib_fingerprint(self) -> dict:
        """What determines the statistics."""
        return {"model_dir": str(self.model_dir.resolve()), "calib": self.calib, "nsamples": self.nsamples,
                "seqlen": self.seqlen, "seed": self.seed, "xtx": self.need_xtx}

    def fingerprint(self) -> dict:
        """What determines the result: a work dir from different settings is never reused."""
        return {**self.calib_fingerprint(), "method": self.method, "shared_input_transform": self.shared_input_transform,
                "ignore": self.ignore, "layers": self.layers, "options": dataclasses.asdict(self.options)}


@dataclass
class Job:
    """One solve: a linear, or several that read the same input and share one B_in."""
    layer: int
    names: list[str]

    @property
    def key(self) -> str:
        return self.names[0] if len(self.names) == 1 else self.names[0] + "+" + "+".join(n.rsplit(".", 1)[-1] for n in self.names[1:])


def find_targets(model: nn.Module, cfg: ConvertConfig) -> dict[str, tuple[int, nn.Linear]]:
    """Decoder-layer nn.Linear modules to compress, by HF name, with their layer index."""
    out = {}
    for i, (layer, prefix) in enumerate(zip(decoder_layers(model), decoder_layer_names(model))):
        if cfg.layers is not None and i not in cfg.layers:
            continue
        for n, m in layer.named_modules():
            full = f"{prefix}.{n}"
            if isinstance(m, nn.Linear) and not matches(full, cfg.ignore):
                out[full] = (i, m)
    if not out:
        raise ValueError(f"{cfg.model_dir}: no nn.Linear layers to compress in the decoder layers of "
                         f"{type(model).__name__} (ignore={cfg.ignore}, layers={cfg.layers})")
    return out


def run_calibration(model, cfg: ConvertConfig, work: WorkDir, samples: torch.Tensor, n_layers: int,
                    loader: LayerLoader) -> None:
    """Statistics of decoder layers 0 .. n_layers-1 (the layers after the last target are never needed)."""
    if all(work.stats_path(i).is_file() for i in range(n_layers)):
        print(f"calibration: reusing statistics in {work.stats_dir}")
        return

    def save(i, stats, groups):
        atomic_save({"stats": {n: dataclasses.asdict(s) for n, s in stats.items()}, "groups": groups}, work.stats_path(i))

    calibrate(model, samples, cfg.device, cfg.need_xtx, save, n_layers, loader)


# ---------------------------------------------------------------- solving
def _solve(method: str, opts: MethodOptions, weights: list[torch.Tensor], stats: LayerStats, device: str,
           threads: int, show_iters: bool) -> tuple[list[dict], dict]:
    """Run one job (in this process or a worker); returns per-linear tensors and the job record."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    w = torch.cat(weights).to(device, torch.float32)
    st = LayerStats(stats.h.to(device), stats.xtx.to(device) if stats.xtx is not None else None, stats.ntokens)
    iters = getattr(opts, "iters", 0)
    bar = progress(total=iters, desc="  iterations", unit="it", inner=True) if show_iters and iters else None
    res: CompressedLayer = get_method(method)(w, st, opts, (lambda it, loss: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    parts, row = [], 0
    for wi in weights:
        n = wi.shape[0]
        b = res.b_out.shape[-1] if res.b_out is not None else None
        s = res.weight[row:row + n].cpu()
        values, bitmask = pack_24(s, mask_24(s))  # the work directory never holds a dense S
        parts.append({"values": values, "bitmask": bitmask,
                      "b_in": res.b_in.cpu() if res.b_in is not None else None,
                      "b_out": res.b_out[row // b:(row + n) // b].cpu() if b else None})
        row += n
    record = {"loss_start": res.loss_start, "loss_end": res.loss_end, "iters": res.iters,
              "seconds": time.perf_counter() - t0, "history": res.history}
    return parts, record


def _job_options(cfg: ConvertConfig, job: Job) -> MethodOptions:
    """Per-job seed derived from the layer name: results don't depend on scheduling order."""
    return dataclasses.replace(cfg.options, seed=cfg.seed + zlib.crc32(job.key.encode()) % 2**31)


def make_jobs(cfg: ConvertConfig, work: WorkDir, targets: dict) -> list[Job]:
    jobs = []
    for i in sorted({i for i, _ in targets.values()}):
        groups = torch.load(work.stats_path(i))["groups"] if cfg.shared_input_transform else None
        names = [n for n, (li, _) in targets.items() if li == i]
        if groups:
            short = {n.rsplit(f".{i}.", 1)[-1]: n for n in names}
            for g in groups:
                members = [short[s] for s in g if s in short]
                if members:
                    jobs.append(Job(i, members))
        else:
            jobs.extend(Job(i, [n]) for n in names)
    return jobs


def job_stats(cfg: ConvertConfig, work: WorkDir, job: Job, cache: dict) -> LayerStats:
    if job.layer not in cache:
        cache.clear()
        cache[job.layer] = torch.load(work.stats_path(job.layer))["stats"]
    saved = cache[job.layer][job.names[0].rsplit(f".{job.layer}.", 1)[-1]]
    return LayerStats(**{**saved, "xtx": saved["xtx"] if cfg.need_xtx else None})


def _shape(job: Job, targets: dict) -> tuple[int, int]:
    ws = [targets[n][1].weight for n in job.names]
    return sum(w.shape[0] for w in ws), ws[0].shape[1]


def print_plan(cfg: ConvertConfig, jobs: list[Job], targets: dict, probe_seconds: dict) -> None:
    shapes: dict[tuple, int] = {}
    for j in jobs:
        shapes[_shape(j, targets)] = shapes.get(_shape(j, targets), 0) + 1
    est = sum(probe_seconds.get(s, 0.0) * c for s, c in shapes.items()) / max(1, cfg.workers)
    print(f"plan: {cfg.method} on {len(targets)} linears in {len({i for i, _ in targets.values()})} decoder layers, "
          f"{len(jobs)} jobs, block size {cfg.block_size or '-'}, device {cfg.device}, workers {cfg.workers}")
    for (n, k), c in sorted(shapes.items()):
        print(f"  {c:4d} × [{n} × {k}]  ~{probe_seconds.get((n, k), 0):.1f} s each")
    print(f"  estimated solve time: {est / 60:.1f} min")


def probe(cfg: ConvertConfig, work: WorkDir, loader: LayerLoader, jobs: list[Job], targets: dict) -> dict:
    """Seconds per job for each distinct shape: a 1- and a 3-iteration trial give setup and per-iteration cost.

    Scaling one short trial by the iteration count multiplies its one-off setup too, which
    overestimated short runs several-fold.
    """
    out, cache = {}, {}
    iters = getattr(cfg.options, "iters", None)
    for j in jobs:
        shp = _shape(j, targets)
        if shp in out:
            continue
        ws = loader.weights([f"{n}.weight" for n in j.names])

        def trial(n_iters):
            opts = dataclasses.replace(_job_options(cfg, j), iters=n_iters, patience=10**9) if iters else _job_options(cfg, j)
            t0 = time.perf_counter()
            _solve(cfg.method, opts, ws, job_stats(cfg, work, j, cache), cfg.device, 0, False)
            return time.perf_counter() - t0

        t1 = trial(1)
        if iters:
            per_iter = max(0.0, (trial(3) - t1) / 2)
            t1 = max(0.0, t1 - per_iter) + per_iter * iters
        out[shp] = t1
    return out


def solve_all(cfg: ConvertConfig, work: WorkDir, loader: LayerLoader, jobs: list[Job], targets: dict) -> None:
    todo = [j for j in jobs if not work.result_path(j.key).is_file()]
    if len(todo) < len(jobs):
        print(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} jobs already done in {work.root}")
    devices = [cfg.device]
    if cfg.device == "cuda":
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    workers = max(1, min(cfg.workers, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0
    cache: dict = {}
    bar = progress(total=len(jobs), initial=len(jobs) - len(todo), desc="layers", unit="job")

    def finish(job, parts, record):
        atomic_save({"names": job.names, "parts": parts, "record": record}, work.result_path(job.key))
        bar.update(1, note=f"{job.key}: proxy loss {record['loss_start']:.4f} -> {record['loss_end']:.4f} "
                           f"({record['iters']} it, {record['seconds']:.1f} s)")

    args = lambda j, dev: (cfg.method, _job_options(cfg, j), loader.weights([f"{n}.weight" for n in j.names]),  # noqa: E731
                           job_stats(cfg, work, j, cache), dev, threads)
    if workers == 1:
        for j in todo:
            finish(j, *_solve(*args(j, devices[0]), show_iters=True))
    else:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_solve, *args(j, devices[k % len(devices)]), False): j for k, j in enumerate(todo)}
            for f in cf.as_completed(futs):
                finish(futs[f], *f.result())
    bar.close()


# ---------------------------------------------------------------- the checkpoint
def job_record(cfg: ConvertConfig, job: Job, saved: dict) -> dict:
    return {"job": job.key, "names": job.names, "method": cfg.method, "block_size": cfg.block_size, **saved["record"]}


def copy_extras(src: Path, dst: Path) -> None:
    """Tokenizer files, generation config, chat template: everything but weights and config."""
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", INDEX_FILE):
            shutil.copy2(f, dst / f.name)


def checkpoint_config(cfg: ConvertConfig, hf_config: dict, model, targets: dict) -> tuple[dict, ArmorQuantizationConfig]:
    """config.json of the output (dtype as written) and its quantization_config."""
    uncompressed = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in targets]
    qcfg = ArmorQuantizationConfig(
        block_size=cfg.block_size, method=cfg.method,
        ignore=sorted(set(cfg.ignore) | set(uncompressed)), shared_input_transform=cfg.shared_input_transform,
        calibration=CalibrationRecord(cfg.calib, cfg.nsamples, cfg.seqlen),
        method_args=dataclasses.asdict(cfg.options))
    hf_config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    if cfg.dtype:
        hf_config["dtype"] = hf_config["torch_dtype"] = cfg.dtype
    return hf_config, qcfg


def write_checkpoint(cfg: ConvertConfig, work: WorkDir, loader: LayerLoader, jobs: list[Job], targets: dict,
                     hf_config: dict, t0: float) -> None:
    """The checkpoint from the finished jobs, layer by layer, with the report of every job."""
    hf_config, qcfg = checkpoint_config(cfg, hf_config, loader.model, targets)
    records: list[dict] = []

    def layer_results(i: int) -> list[dict]:
        saved = [(j, torch.load(work.result_path(j.key))) for j in jobs if j.layer == i]
        records.extend(job_record(cfg, j, s) for j, s in saved)
        return [s for _, s in saved]

    def publish(writer):
        shapes = [tuple(m.weight.shape) for _, m in targets.values()]
        summary = {"method": cfg.method, "seconds": time.perf_counter() - t0, "layers": records,
                   "overhead": overhead_ratio(shapes, cfg.block_size) if cfg.block_size else 0.0}

        def save_extras(dst: Path):
            copy_extras(cfg.model_dir, dst)
            report.write(dst, summary)

        return writer.publish(hf_config, qcfg, save_extras)

    write_output(cfg.out_dir, cfg.overwrite, cfg.model_dir, loader.layer_names, layer_results,
                 {f"{n}.weight" for n in targets},
                 getattr(torch, cfg.dtype) if cfg.dtype else next(loader.model.parameters()).dtype, publish)


def check_inputs(cfg: ConvertConfig) -> tuple[dict, torch.Tensor]:
    """Everything that can be known before loading the model: (config.json, calibration token ids)."""
    from transformers import AutoTokenizer

    hf_config = read_hf_config(cfg.model_dir)
    check_paths(cfg.model_dir, cfg.out_dir, cfg.work_dir, cfg.overwrite)
    check_layers(cfg.layers, hf_config.get("num_hidden_layers", 0), cfg.model_dir)
    check_device(cfg.device)
    max_pos = hf_config.get("max_position_embeddings")
    if max_pos and cfg.seqlen > max_pos:
        raise ValueError(f"--seqlen {cfg.seqlen}: longer than the model's max_position_embeddings {max_pos}")
    check_disk(cfg.out_dir, disk_needed(cfg.model_dir, hf_config))
    tok = AutoTokenizer.from_pretrained(cfg.model_dir)
    samples = calibration_samples(tok, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed)
    check_tokens(samples, hf_config["vocab_size"], cfg.model_dir)
    return hf_config, samples


def convert(cfg: ConvertConfig) -> Path:
    """Run the whole conversion; returns the checkpoint directory."""
    hf_config, samples = check_inputs(cfg)
    t0 = time.perf_counter()
    loader = LayerLoader(cfg.model_dir)
    model = loader.model
    check_ignore(cfg.ignore, [n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
    targets = find_targets(model, cfg)
    check_shapes(targets, cfg.block_size)
    check_finite(targets, loader.weights, cfg.model_dir)
    work = WorkDir(cfg.work_dir, cfg.stats_dir)
    work.open(cfg.fingerprint(), cfg.calib_fingerprint(), cfg.discard_work)
    run_calibration(model, cfg, work, samples, 1 + max(i for i, _ in targets.values()), loader)
    jobs = make_jobs(cfg, work, targets)
    print_plan(cfg, jobs, targets, probe(cfg, work, loader, jobs, targets))
    solve_all(cfg, work, loader, jobs, targets)
    write_checkpoint(cfg, work, loader, jobs, targets, hf_config, t0)
    if not cfg.keep_work:
        work.remove()
    return cfg.out_dir
