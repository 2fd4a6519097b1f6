"""The conversion pipeline: HF dir -> calibration statistics -> per-layer solves -> ARMOR checkpoint.

Orchestration only; the math lives in converters/methods. Everything between steps goes through
a work directory so that a run killed at any point (even SIGKILL) resumes where it stopped and,
with the same seed, produces the same checkpoint: each layer job is deterministic and is saved
atomically once finished.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import fnmatch
import json
import multiprocessing as mp
import os
import re
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from armor_vllm.format import (ArmorQuantizationConfig, CalibrationRecord, layer_tensors,
                               overhead_ratio, valid_block_sizes, weight_bytes, write_checkpoint)

from . import report
from .calibration import calibrate, decoder_layers
from .data import calibration_samples
from .methods import CompressedLayer, LayerStats, MethodConfig, get_method

NEEDS_XTX = {"sparsegpt"}
# quick/default fit a 2-core CPU for the 135M default model; paper = the authors' protocol.
PRESETS = {
    "quick": dict(nsamples=16, seqlen=512, iters=20),
    "default": dict(nsamples=64, seqlen=512, iters=100),
    "paper": dict(nsamples=128, seqlen=4096, iters=20000, block_size=128, solver="adam", groups_per_tile=1),
}


@dataclass
class ConvertConfig:
    model_dir: Path
    out_dir: Path
    method: str = "armor"
    method_cfg: MethodConfig = field(default_factory=MethodConfig)
    calib: str = "wiki"
    nsamples: int = 64
    seqlen: int = 512
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

    def __post_init__(self):
        self.model_dir, self.out_dir = Path(self.model_dir), Path(self.out_dir)
        self.work_dir = Path(self.work_dir) if self.work_dir else self.out_dir.with_name(self.out_dir.name + ".armor-work")
        self.stats_dir = Path(self.stats_dir) if self.stats_dir else self.work_dir / "stats"

    @property
    def need_xtx(self) -> bool:
        return self.collect_xtx or self.method in NEEDS_XTX

    def calib_fingerprint(self) -> dict:
        """What determines the statistics."""
        return {"model_dir": str(self.model_dir.resolve()), "calib": self.calib, "nsamples": self.nsamples,
                "seqlen": self.seqlen, "seed": self.method_cfg.seed, "xtx": self.need_xtx}

    def fingerprint(self) -> dict:
        """What determines the result: a work dir from different settings is never reused."""
        return {**self.calib_fingerprint(), "method": self.method, "shared_input_transform": self.shared_input_transform,
                "ignore": self.ignore, "layers": self.layers, "method_cfg": dataclasses.asdict(self.method_cfg)}


@dataclass
class Job:
    """One solve: a linear, or several that read the same input and share one B_in."""
    layer: int
    names: list[str]

    @property
    def key(self) -> str:
        return self.names[0] if len(self.names) == 1 else self.names[0] + "+" + "+".join(n.rsplit(".", 1)[-1] for n in self.names[1:])


# ---------------------------------------------------------------- checks up front
def matches(name: str, patterns: list[str]) -> bool:
    """compressed-tensors convention: exact name, trailing module name, 're:' regex, or glob."""
    for p in patterns:
        if p.startswith("re:") and re.match(p[3:], name):
            return True
        if name == p or name.endswith("." + p) or fnmatch.fnmatch(name, p):
            return True
    return False


def check_model_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory does not exist")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a Hugging Face model directory")
    if not list(model_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (only safetensors checkpoints are supported)")


def find_targets(model: nn.Module, cfg: ConvertConfig) -> dict[str, tuple[int, nn.Linear]]:
    """Decoder-layer nn.Linear modules to compress, by HF name, with their layer index."""
    layers = decoder_layers(model)
    prefix = {id(l): n for n, l in model.named_modules() if any(l is x for x in layers)}
    out = {}
    for i, layer in enumerate(layers):
        if cfg.layers is not None and i not in cfg.layers:
            continue
        for n, m in layer.named_modules():
            full = f"{prefix[id(layer)]}.{n}"
            if isinstance(m, nn.Linear) and not matches(full, cfg.ignore):
                out[full] = (i, m)
    if not out:
        raise ValueError(f"{cfg.model_dir}: no nn.Linear layers to compress in the decoder layers of "
                         f"{type(model).__name__} (ignore={cfg.ignore}, layers={cfg.layers})")
    return out


def check_shapes(targets: dict[str, tuple[int, nn.Linear]], cfg: ConvertConfig) -> None:
    dims = sorted({d for _, m in targets.values() for d in m.weight.shape})
    b = cfg.method_cfg.block_size
    for name, (_, m) in targets.items():
        n, k = m.weight.shape
        if k % 8:
            raise ValueError(f"{name}: input dimension K={k} is not a multiple of 8 (2:4 packing needs K % 8 == 0)")
        if cfg.method == "armor" and (n % b or k % b):
            raise ValueError(f"{name}: block size {b} does not divide N={n} and K={k}; "
                             f"valid block sizes for this model: {valid_block_sizes(dims)}")
        if not torch.isfinite(m.weight).all():
            raise FloatingPointError(f"{cfg.model_dir}: weight of {name} contains NaN/Inf")


def check_disk(cfg: ConvertConfig) -> None:
    need = weight_bytes(cfg.model_dir)
    parent = cfg.out_dir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise OSError(f"{parent}: {free / 2**30:.1f} GiB free, the checkpoint and work files need about {need / 2**30:.1f} GiB")


# ---------------------------------------------------------------- work directory
def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _claim(directory: Path, fingerprint: dict, what: str) -> None:
    """Mark a directory as holding the results of `fingerprint`; refuse one from other settings."""
    settings = directory / "settings.json"
    if settings.is_file():
        if json.loads(settings.read_text()) != json.loads(json.dumps(fingerprint)):
            raise FileExistsError(f"{directory}: {what} of a run with other settings; delete it or choose another")
        return
    directory.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps(fingerprint, indent=2))


def prepare_work_dir(cfg: ConvertConfig) -> None:
    _claim(cfg.work_dir, cfg.fingerprint(), "work directory")
    _claim(cfg.stats_dir, cfg.calib_fingerprint(), "statistics directory")
    (cfg.work_dir / "layers").mkdir(exist_ok=True)


def stats_path(cfg: ConvertConfig, i: int) -> Path:
    return cfg.stats_dir / f"layer_{i:04d}.pt"


def run_calibration(model, cfg: ConvertConfig, n_layers: int) -> None:
    if all(stats_path(cfg, i).is_file() for i in range(n_layers)):
        print(f"calibration: reusing statistics in {cfg.stats_dir}")
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model_dir)
    samples = calibration_samples(tok, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.method_cfg.seed)

    def save(i, stats, groups):
        _atomic_save({"stats": {n: dataclasses.asdict(s) for n, s in stats.items()}, "groups": groups}, stats_path(cfg, i))

    calibrate(model, samples, cfg.device, cfg.need_xtx, save)


# ---------------------------------------------------------------- solving
def _solve(method: str, mcfg: MethodConfig, weights: list[torch.Tensor], stats: LayerStats, device: str,
           threads: int, show_iters: bool) -> tuple[list[dict], dict]:
    """Run one job (in this process or a worker); returns per-linear tensors and the job record."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    w = torch.cat(weights).to(device, torch.float32)
    st = LayerStats(stats.h.to(device), stats.xtx.to(device) if stats.xtx is not None else None, stats.ntokens)
    bar = tqdm(total=mcfg.iters, desc="  iterations", leave=False, unit="it") if show_iters else None
    res: CompressedLayer = get_method(method)(w, st, mcfg, (lambda it, loss: bar.update(1)) if bar else None)
    if bar:
        bar.close()
    parts, row = [], 0
    for wi in weights:
        n = wi.shape[0]
        b = res.b_out.shape[-1] if res.b_out is not None else None
        parts.append({"weight": res.weight[row:row + n].cpu(),
                      "b_in": res.b_in.cpu() if res.b_in is not None else None,
                      "b_out": res.b_out[row // b:(row + n) // b].cpu() if b else None})
        row += n
    record = {"loss_start": res.loss_start, "loss_end": res.loss_end, "iters": res.iters,
              "seconds": time.perf_counter() - t0, "history": res.history}
    return parts, record


def _job_cfg(cfg: ConvertConfig, job: Job) -> MethodConfig:
    """Per-job seed derived from the layer name: results don't depend on scheduling order."""
    return dataclasses.replace(cfg.method_cfg, seed=cfg.method_cfg.seed + zlib.crc32(job.key.encode()) % 2**31)


def make_jobs(cfg: ConvertConfig, targets: dict) -> list[Job]:
    jobs = []
    for i in sorted({i for i, _ in targets.values()}):
        groups = torch.load(stats_path(cfg, i))["groups"] if cfg.shared_input_transform else None
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


def job_stats(cfg: ConvertConfig, job: Job, cache: dict) -> LayerStats:
    if job.layer not in cache:
        cache.clear()
        cache[job.layer] = torch.load(stats_path(cfg, job.layer))["stats"]
    short = job.names[0].rsplit(f".{job.layer}.", 1)[-1]
    return LayerStats(**cache[job.layer][short])


def print_plan(cfg: ConvertConfig, jobs: list[Job], targets: dict, probe_seconds: dict) -> None:
    shapes: dict[tuple, int] = {}
    for j in jobs:
        shp = (sum(targets[n][1].weight.shape[0] for n in j.names), targets[j.names[0]][1].weight.shape[1])
        shapes[shp] = shapes.get(shp, 0) + 1
    est = sum(probe_seconds.get(s, 0.0) * c for s, c in shapes.items()) / max(1, cfg.workers)
    print(f"plan: {cfg.method} on {len(targets)} linears in {len({i for i, _ in targets.values()})} decoder layers, "
          f"{len(jobs)} jobs, block size {cfg.method_cfg.block_size if cfg.method == 'armor' else '-'}, "
          f"device {cfg.device}, workers {cfg.workers}")
    for (n, k), c in sorted(shapes.items()):
        print(f"  {c:4d} × [{n} × {k}]  ~{probe_seconds.get((n, k), 0):.1f} s each")
    print(f"  estimated solve time: {est / 60:.1f} min")


def probe(cfg: ConvertConfig, jobs: list[Job], targets: dict) -> dict:
    """Seconds per job for each distinct shape, from a 2-iteration trial scaled to the budget."""
    out, cache = {}, {}
    for j in jobs:
        ws = [targets[n][1].weight.detach() for n in j.names]
        shp = (sum(w.shape[0] for w in ws), ws[0].shape[1])
        if shp in out:
            continue
        trial = dataclasses.replace(_job_cfg(cfg, j), iters=2, patience=10**9)
        t0 = time.perf_counter()
        _solve(cfg.method, trial, ws, job_stats(cfg, j, cache), cfg.device, 0, False)
        dt = time.perf_counter() - t0
        out[shp] = dt * cfg.method_cfg.iters / 2 if cfg.method == "armor" else dt
    return out


def result_path(cfg: ConvertConfig, job: Job) -> Path:
    return cfg.work_dir / "layers" / f"{job.key}.pt"


def solve_all(cfg: ConvertConfig, jobs: list[Job], targets: dict) -> None:
    todo = [j for j in jobs if not result_path(cfg, j).is_file()]
    if len(todo) < len(jobs):
        print(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} jobs already done in {cfg.work_dir}")
    devices = [cfg.device]
    if cfg.device == "cuda":
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
    workers = max(1, min(cfg.workers, len(todo)))
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else 0
    cache: dict = {}
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc="layers", unit="job")

    def finish(job, parts, record):
        _atomic_save({"names": job.names, "parts": parts, "record": record}, result_path(cfg, job))
        bar.update(1)
        tqdm.write(f"{job.key}: proxy loss {record['loss_start']:.4f} -> {record['loss_end']:.4f} "
                   f"({record['iters']} it, {record['seconds']:.1f} s)")

    args = lambda j, dev: (cfg.method, _job_cfg(cfg, j), [targets[n][1].weight.detach().clone() for n in j.names],  # noqa: E731
                           job_stats(cfg, j, cache), dev, threads)
    if workers == 1:
        for j in todo:
            finish(j, *_solve(*args(j, devices[0]), show_iters=cfg.method == "armor"))
    else:
        with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(_solve, *args(j, devices[k % len(devices)]), False): j for k, j in enumerate(todo)}
            for f in cf.as_completed(futs):
                finish(futs[f], *f.result())
    bar.close()


# ---------------------------------------------------------------- assembling the checkpoint
def assemble(cfg: ConvertConfig, model, jobs: list[Job], targets: dict) -> tuple[dict, list[dict]]:
    """All output tensors (compressed linears + every other tensor of the source) and job records."""
    out_dtype = getattr(torch, cfg.dtype) if cfg.dtype else next(model.parameters()).dtype
    tensors, records = {}, []
    for j in jobs:
        saved = torch.load(result_path(cfg, j))
        for name, part in zip(saved["names"], saved["parts"]):
            bias = targets[name][1].bias
            tensors.update(layer_tensors(name, part["weight"], part["b_in"], part["b_out"],
                                         bias.detach() if bias is not None else None, dtype=out_dtype))
        records.append({"job": j.key, "names": j.names, "method": cfg.method,
                        "block_size": cfg.method_cfg.block_size if cfg.method == "armor" else None, **saved["record"]})
    skip = {f"{n}.{s}" for n in targets for s in ("weight", "bias")}
    for f in sorted(cfg.model_dir.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for nm in fh.keys():
                if nm not in skip:
                    t = fh.get_tensor(nm)
                    tensors[nm] = t.to(out_dtype) if t.is_floating_point() else t
    return tensors, records


def copy_extras(src: Path):
    """Tokenizer files, generation config, chat template: everything but weights and config."""
    def save(dst: Path):
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy2(f, dst / f.name)
    return save


def convert(cfg: ConvertConfig) -> Path:
    """Run the whole conversion; returns the checkpoint directory."""
    from transformers import AutoModelForCausalLM

    get_method(cfg.method)
    check_model_dir(cfg.model_dir)
    if cfg.out_dir.exists() and not cfg.overwrite:
        raise FileExistsError(f"{cfg.out_dir}: output directory exists (pass --overwrite to replace it)")
    check_disk(cfg)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(cfg.model_dir, dtype="auto").eval()
    targets = find_targets(model, cfg)
    check_shapes(targets, cfg)
    prepare_work_dir(cfg)
    run_calibration(model, cfg, len(decoder_layers(model)))
    jobs = make_jobs(cfg, targets)
    print_plan(cfg, jobs, targets, probe(cfg, jobs, targets))
    solve_all(cfg, jobs, targets)
    tensors, records = assemble(cfg, model, jobs, targets)
    uncompressed = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in targets]
    qcfg = ArmorQuantizationConfig(
        block_size=cfg.method_cfg.block_size if cfg.method == "armor" else None, method=cfg.method,
        ignore=sorted(set(cfg.ignore) | set(uncompressed)), shared_input_transform=cfg.shared_input_transform,
        calibration=CalibrationRecord(cfg.calib, cfg.nsamples, cfg.seqlen),
        method_args={k: v for k, v in dataclasses.asdict(cfg.method_cfg).items()})
    hf_config = json.loads((cfg.model_dir / "config.json").read_text())
    hf_config.pop("quantization_config", None)
    if cfg.dtype:
        hf_config["dtype"] = hf_config["torch_dtype"] = cfg.dtype
    shapes = [tuple(m.weight.shape) for _, m in targets.values()]
    summary = {"method": cfg.method, "seconds": time.perf_counter() - t0, "layers": records,
               "overhead": overhead_ratio(shapes, cfg.method_cfg.block_size) if cfg.method == "armor" else 0.0}
    extras = copy_extras(cfg.model_dir)

    def save_extras(dst: Path):
        extras(dst)
        report.write(dst, summary)

    write_checkpoint(cfg.out_dir, tensors, hf_config, qcfg, save_extras, overwrite=cfg.overwrite)
    if not cfg.keep_work:
        shutil.rmtree(cfg.work_dir, ignore_errors=True)
    return cfg.out_dir
