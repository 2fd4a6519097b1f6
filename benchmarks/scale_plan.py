"""A 70B conversion plan on paper (issue #9): memory per step, disk and time, from solve rates measured here.

Why measured and not quoted: a plan is only as good as its cost per weight·iteration, and that
depends on the machine (threads, BLAS, GPU), so this command times the converter's real solver code
(ARMOR exact and adam at b = 128, SparseGPT) on synthetic layers in the large-shape regime, then
scales to Llama-3-70B with the pipeline's own rules (converters/conversion/pipeline.py, calibration.py,
jobs.py). GPU rows are measured only when torch sees a GPU; otherwise they show the formula and no
number. Writes the section "plan_70b" of docs/scale.md with --doc. Usage, from the repository root:

    python -m benchmarks.scale_plan --doc docs/scale.md
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading
import time
from pathlib import Path

import torch

from converters.conversion import checks
from converters.conversion.driver import PRESETS
from converters.conversion.methods import LayerStats, get_method
from converters.conversion.methods.sparsegpt import SparseGPTOptions

from .common import footer, write_section
from .solver_speed import synthetic_layer, solver_cfg, trace_run, warm_up

B = 128                                      # block size, as the user passes it
ARMOR_SHAPES = ["4096x4096", "11008x4096"]   # large-shape regime (docs/results.md, solver_speed sweep)
SPARSEGPT_SHAPES = ["512x1024", "1024x1024"]   # N doubles at one K: separates per-weight and per-column cost
GB = 1e9
# Llama-3-70B
L70 = dict(layers=80, hidden=8192, inter=28672, vocab=128256, heads=64, kv_heads=8, elem=2)
LINEARS = {"q_proj": (8192, 8192), "k_proj": (1024, 8192), "v_proj": (1024, 8192), "o_proj": (8192, 8192),
           "gate_proj": (28672, 8192), "up_proj": (28672, 8192), "down_proj": (8192, 28672)}
P_LAYER = sum(n * k for n, k in LINEARS.values()) + 2 * L70["hidden"]           # + 2 RMSNorms
P_MODEL = L70["layers"] * P_LAYER + 2 * L70["vocab"] * L70["hidden"] + L70["hidden"]
RUNTIME = 0.6 * GB                           # torch + transformers, docs/converter.md "Memory"
NODES = [("this machine", None), ("1 node × 8 GPUs", 8), ("4 nodes × 8 GPUs (Ray)", 32)]
PLANS = [  # (label, method, preset name, solver)
    ("ARMOR default (64×512, 100 it exact, b=128)", "armor", "default", "exact"),
    ("ARMOR paper (128×4096, 20,000 it adam, b=128)", "armor", "paper", "adam"),
    ("SparseGPT (64×512, one-shot)", "sparsegpt", "default", None),
]


# ---------------------------------------------------------------- measuring
def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Peak:
    """Peak extra memory during a block: CUDA's allocator peak, or host RSS sampled every 5 ms (a lower bound)."""

    def __init__(self, device: str):
        self.device, self.peak, self.stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss()
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss() - self.base)

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.stop.set()
            self.thread.join()


def shape(s: str) -> tuple[int, int]:
    n, k = map(int, s.split("x"))
    return n, k


def measure_armor(device: str, iters: int, cfg_args) -> list[dict]:
    """ns per weight·iteration (steady state, iterations 2..n) and setup s per weight, per solver and shape."""
    rows = []
    for solver in ("exact", "adam"):
        for s in ARMOR_SHAPES:
            n, k = shape(s)
            w, h = (t.to(device) for t in synthetic_layer(n, k, seed=0))
            with Peak(device) as pk:
                r = trace_run(w, h, solver_cfg(solver, iters, B, cfg_args))
            rows.append(dict(solver=solver, shape=s, sec_per_iter=r["sec_per_iter"], setup=r["setup"],
                             ns=r["sec_per_iter"] / (n * k) * 1e9, setup_ns=r["setup"] / (n * k) * 1e9,
                             bytes_per_weight=pk.peak / (n * k)))
            print(f"  {device} {solver} {s}: {r['sec_per_iter']:.2f} s/it, setup {r['setup']:.2f} s, "
                  f"peak +{pk.peak / GB:.2f} GB", flush=True)
            del w, h
    return rows


def measure_sparsegpt(device: str, gflops: float) -> dict:
    """SparseGPT's cost model, t = α·N·K + g·K + (N·K² + 5K³/3) / R, fitted on SPARSEGPT_SHAPES.

    From the code: the per-column OBS updates touch N×(block − i) values (α·N·K, memory-bound), the
    Python loop costs g per column, the lazy block updates and the Cholesky factorisations are
    N·K² + ~5K³/3 FLOPs at the measured matmul rate R. Two shapes with the same K and N doubled give
    α and g; a per-weight rate alone would not scale to K = 28672.
    """
    rows = []
    for s in SPARSEGPT_SHAPES:
        n, k = shape(s)
        w, h = synthetic_layer(n, k, seed=0)
        low = torch.randn(k, 64, generator=torch.Generator().manual_seed(1))
        xtx = (torch.diag(h) + low @ low.T * (h.mean() / 64)).to(device)
        w, h = w.to(device), h.to(device)
        with Peak(device) as pk:
            t0 = time.perf_counter()
            get_method("sparsegpt")(w, LayerStats(h=h, xtx=xtx, ntokens=1), SparseGPTOptions(), None)
            if device == "cuda":
                torch.cuda.synchronize()
            sec = time.perf_counter() - t0
        rows.append(dict(shape=s, seconds=sec, peak=pk.peak, rest=sec - sparsegpt_flops(n, k) / (gflops * 1e9)))
        print(f"  {device} sparsegpt {s}: {sec:.1f} s, peak +{pk.peak / GB:.2f} GB", flush=True)
        del w, h, xtx
    (n1, k), (n2, _) = (shape(r["shape"]) for r in rows)
    alpha = max((rows[1]["rest"] - rows[0]["rest"]) / ((n2 - n1) * k), 0.0)
    return dict(rows=rows, alpha=alpha, g=max((rows[0]["rest"] - alpha * n1 * k) / k, 0.0), gflops=gflops)


def sparsegpt_flops(n: int, k: int) -> float:
    return n * k * k + 5 * k ** 3 / 3


def sparsegpt_bytes(n: int, k: int) -> float:
    """Peak extra bytes of one SparseGPT solve, from the code: W clone and output (8·N·K), the H copy, its
    Cholesky factor, H⁻¹ and U (16·K²); the XᵀX input itself is counted with the job's inputs."""
    return 8 * n * k + 16 * k * k


def measure_gflops(device: str) -> float:
    """fp32 matmul throughput, the calibration forward's dominant cost (it runs each layer in fp32)."""
    m = 2048 if device == "cuda" else 512
    x, w = torch.randn(m, 4096, device=device), torch.randn(4096, 4096, device=device)
    x @ w.T
    reps = 20 if device == "cuda" else 3
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        x @ w.T
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * m * 4096 * 4096 * reps / (time.perf_counter() - t0) / 1e9


# ---------------------------------------------------------------- the plan
def tokens(preset: str) -> tuple[int, int]:
    return PRESETS[preset]["nsamples"], PRESETS[preset]["seqlen"]


def calib_flops(preset: str, xtx: bool) -> float:
    """One dense pass of one layer: 2·params·tokens, + attention 4·seqlen·hidden per token (QKᵀ and AV, not
    halved for the causal mask), + XᵀX 2·tokens·K² per linear (each linear's hook computes its own)."""
    ns, sl = tokens(preset)
    t = ns * sl
    f = 2 * P_LAYER * t + 4 * sl * L70["hidden"] * t
    return f + (2 * t * sum(k * k for _, k in LINEARS.values()) if xtx else 0)


def solve_seconds(plan: tuple, rate: dict | None, n: int, k: int) -> float | None:
    """setup + iterations · ns per weight·iteration · N·K (ARMOR); SparseGPT's model (measure_sparsegpt)."""
    _, method, preset, solver = plan
    if rate is None:
        return None
    if method == "sparsegpt":
        sg = rate["sparsegpt"]
        return sg["alpha"] * n * k + sg["g"] * k + sparsegpt_flops(n, k) / (sg["gflops"] * 1e9)
    r = rate[solver]
    return (max(r["setup_ns"], 0.0) + PRESETS[preset]["iters"] * r["ns"]) * n * k * 1e-9   # noise can make it < 0


def makespan(jobs: list[float], devices: int) -> float:
    """Longest-first greedy: the time one layer's jobs take on `devices` (sequential calibration)."""
    load = [0.0] * devices
    for t in sorted(jobs, reverse=True):
        load[load.index(min(load))] += t
    return max(load)


def times(plan: tuple, rate: dict | None, devices: int, shared: bool = False) -> dict | None:
    """Dense: calibration and solves overlap, T ≈ max(layers·c, W/D) + the longest job (drain); on a
    CPU-only machine they share the cores, so T ≈ layers·c + W/D. Sequential: per layer a statistics
    pass, the layer's 7 jobs on min(D, 7) devices, a second pass."""
    if rate is None or rate.get("gflops") is None:
        return None
    jobs = [solve_seconds(plan, rate, n, k) for n, k in LINEARS.values()]
    c = calib_flops(plan[2], plan[1] == "sparsegpt") / (rate["gflops"] * 1e9)
    nl = L70["layers"]
    work = nl * sum(jobs)
    dense = nl * c + work / devices if shared else max(nl * c, work / devices) + max(jobs)
    return dict(cal=nl * c, work=work, dense=dense,
                seq=nl * (2 * c + makespan(jobs, min(devices, len(jobs)))))


def host_memory(plan: tuple, act: str, slots: int, cpu: bool, solve_bytes: float) -> dict:
    """Bytes the converter's host holds at its peak step (components as in converters/conversion/pipeline.py)."""
    _, method, preset, _ = plan
    ns, sl = tokens(preset)
    h, p, xtx = L70["hidden"], P_LAYER, method == "sparsegpt"
    shapes = list(LINEARS.values())
    job_in = [2 * n * k + 4 * k + (4 * k * k if xtx else 0) for n, k in shapes]       # bf16 W + h (+ XᵀX)
    window = max(sum((job_in * 3)[i:i + 2 * slots]) for i in range(len(shapes)))    # 2·slots queued jobs
    one = 4 if act == "ram fp32" else 2
    return {
        "runtime": RUNTIME,
        "layer": (4 if cpu else 2) * p,                                  # fp32 when calibrating on CPU
        "activations": 2 * (ns if act == "ram fp32" else 1) * sl * h * one,
        "forward temps": sl * (3 * L70["inter"] + 4 * h) * 4 if cpu else 0,
        "statistics": 4 * sum(k * k for _, k in shapes) if xtx else 4 * sum(k for _, k in shapes),
        "queued inputs": window,
        "worker copies + solve": slots * (RUNTIME + max(job_in) + (solve_bytes if cpu else 0)),
        # the layer's fp32 results read back (values, bitmask, blocks) + its bf16 shard
        "output shard": p * (2 + 1 / 8 + 1 + 1 / 8) + (sum(n + k for n, k in shapes) * B * 6 if not xtx else 0),
    }


def gpu_memory(plan: tuple, solve_bytes: float | None) -> tuple[float, float | None]:
    """(calibration step, largest solve). Calibration: the layer in fp32, one sample's fp32 activations
    (in, out, q/k/v/attention out, 3 MLP-wide tensors, one x² temporary), SDPA attention (no L² scores),
    and XᵀX accumulators + one product for SparseGPT. Solve: measured bytes per weight × N·K."""
    _, method, preset, _ = plan
    _, sl = tokens(preset)
    h, kv = L70["hidden"], L70["hidden"] * L70["kv_heads"] // L70["heads"]
    act = sl * 4 * (4 * h + 2 * kv + 3 * L70["inter"] + L70["inter"])
    xtx = 4 * (sum(k * k for _, k in LINEARS.values()) + max(k for _, k in LINEARS.values()) ** 2) \
        if method == "sparsegpt" else 0
    return 4 * P_LAYER + act + xtx, solve_bytes


def disk(plan: tuple, act: str) -> dict:
    """Output checkpoint (bf16 values, bitmask, B blocks, dense embeddings/lm_head), the work directory's
    finished jobs (values and blocks fp32, converters/conversion/jobs.py), statistics, spilled activations (two buffers)."""
    _, method, preset, _ = plan
    ns, sl = tokens(preset)
    nl, shapes, armor = L70["layers"], list(LINEARS.values()), method == "armor"
    lin = sum(n * k for n, k in shapes)
    blocks = sum(n + k for n, k in shapes) * B if armor else 0
    dense_rest = P_MODEL - nl * lin
    return {"output": nl * (lin * (1 + 1 / 8) + 2 * blocks) + 2 * dense_rest,
            "finished jobs": nl * (lin * (2 + 1 / 8) + 4 * blocks),
            "statistics": nl * 4 * (sum(k for _, k in shapes) + (sum(k * k for _, k in shapes) if not armor else 0)),
            "activations": 0 if act == "ram fp32" else 2 * ns * sl * L70["hidden"] * 2}


# ---------------------------------------------------------------- the report
def fmt_s(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def gb(x: float | None) -> str:
    return "–" if x is None else f"{x / GB:.1f}"


def markdown(m: dict) -> str:
    cpu_all, cpu1, cuda = m["rates"].get("cpu_all"), m["rates"].get("cpu_1"), m["rates"].get("cuda")
    nogpu = "not measured: no GPU on this machine"
    device_rates = [(label, m["rates"].get(key)) for key, label in
                    (("cpu_1", "CPU, 1 thread"), ("cpu_all", f"CPU, {m['threads']} threads"), ("cuda", "CUDA"))]
    out = ["## A 70B plan on paper", "",
           f"Llama-3-70B ({L70['layers']} layers, hidden {L70['hidden']}, MLP {L70['inter']}, {L70['heads']} heads, "
           f"{L70['kv_heads']} KV heads, vocab {L70['vocab']}, bf16): {P_LAYER / 1e6:.1f} M parameters per decoder "
           f"layer, {P_MODEL / 1e9:.2f} B in all, {L70['layers'] * 7} solve jobs (7 linears per layer). Block size "
           f"b = {B}. Everything below is computed by `benchmarks/scale_plan.py` from the rates measured in the first "
           "table and the pipeline's rules; a dash is a number that needs a rate this machine could not measure.", "",
           "### Measured solve rates", "",
           "Real solver code (`converters/conversion/methods`) on synthetic layers (Gaussian W with 1% heavy columns, log-normal h, "
           f"as in `solver_speed`), b = {B}, {m['iters']} iterations (ns per weight·it from iterations 2..n; setup is "
           "the NoWag-P start and tiling, from 2 iterations noisy, taken as 0 where negative). Peak = extra memory during the solve (host RSS sampled every "
           "5 ms, a lower bound; CUDA: the allocator's peak), per weight of the layer.", "",
           "| device | solver | N×K | s/it | ns per weight·it | setup s | peak bytes per weight |",
           "|---|---|---|--:|--:|--:|--:|"]
    for label, rate in device_rates:
        if rate is None:
            out.append(f"| {label} | exact, adam | – | {nogpu} | | | |")
            continue
        for r in rate["rows"]:
            out.append(f"| {label} | {r['solver']} | {r['shape']} | {r['sec_per_iter']:.2f} | {r['ns']:.0f} | "
                       f"{r['setup']:.2f} | {r['bytes_per_weight']:.1f} |")
    out += ["", "SparseGPT (one-shot). From its code, t = α·N·K (per-column OBS updates, memory-bound) + g·K (the "
            "Python loop over columns) + (N·K² + 5K³/3) / R (lazy block updates, Cholesky factorisations; R the "
            "measured matmul rate below); α and g from two small shapes with the same K (small for the run time: "
            "their column slices fit in cache, so α may be low for N = 28672; a per-weight rate alone would "
            "not scale to K = 28672):", "",
            "| device | N×K | seconds | peak GB (RSS) | α, ns per weight | g, ms per column | peak GB from the code |",
            "|---|---|--:|--:|--:|--:|--:|"]
    for label, rate in device_rates:
        if rate is None:
            out.append(f"| {label} | – | {nogpu} | | | | |")
            continue
        sg = rate["sparsegpt"]
        for r in sg["rows"]:
            out.append(f"| {label} | {r['shape']} | {r['seconds']:.1f} | {r['peak'] / GB:.2f} | "
                       f"{sg['alpha'] * 1e9:.1f} | {sg['g'] * 1e3:.2f} | {sparsegpt_bytes(*shape(r['shape'])) / GB:.2f} |")
    out += ["", "fp32 matmul throughput (the calibration pass runs each layer in fp32): "
            + "; ".join(f"{lbl} {m['rates'][k]['gflops']:.0f} GFLOP/s" for k, lbl in
                        (("cpu_all", f"CPU {m['threads']} threads"), ("cuda", "CUDA")) if k in m["rates"])
            + f"; CPU 1 thread {cpu1['sparsegpt']['gflops']:.0f} GFLOP/s (R of SparseGPT's 1-thread rows)"
            + ("" if cuda else f"; CUDA {nogpu}") + "."]

    # rates per weight from the largest measured shape
    def per(rate):
        if rate is None:
            return None
        big = {r["solver"]: r for r in rate["rows"] if r["shape"] == ARMOR_SHAPES[-1]}
        return {**big, "sparsegpt": rate["sparsegpt"], "gflops": rate["gflops"]}
    # this machine: one worker with all threads, or one single-thread worker per core (ns of 1 thread)
    here = {"all": (per(cpu_all), 1), "1": (per(cpu1), m["threads"])}
    gpu = per(cuda)

    out += ["", "### Time", "",
            "Solve of one linear: setup + iterations × ns per weight·it × N·K (rates of the largest shape measured, "
            f"{ARMOR_SHAPES[-1]}; early stopping would only shorten it). Calibration of one layer: "
            "2·params·tokens + 4·seqlen·hidden·tokens (attention) FLOPs, + 2·tokens·K² per linear for SparseGPT's "
            "XᵀX, at the measured fp32 throughput of one device (the calibration runs in the `armor-convert` "
            "process, on one device, also on a cluster). **Dense** calibration overlaps the solves: "
            "T ≈ max(80·c, W/D) + the longest job, W = all solve seconds on one device, D devices (on this CPU-only "
            "machine calibration and solves share the cores: T ≈ 80·c + W/D). **Sequential** "
            "calibration waits for each layer's 7 jobs and runs the layer twice: T ≈ 80·(2c + the 7 jobs' makespan "
            "on min(D, 7) devices) — more than 7 devices do not help it.", "",
            "| plan | where | D | calibration | solves, 1 device (W) | dense T | sequential T |",
            "|---|---|--:|--:|--:|--:|--:|"]
    for plan in PLANS:
        label = plan[0]
        for name, (rate, d) in (("this machine, 1 worker × all threads", here["all"]),
                                (f"this machine, {m['threads']} workers × 1 thread", here["1"])):
            t = times(plan, rate, d, shared=True)
            if t:
                out.append(f"| {label} | {name} | {d} | {fmt_s(t['cal'])} | {fmt_s(t['work'])} | "
                           f"{fmt_s(t['dense'])} | {fmt_s(t['seq'])} |")
        for name, d in NODES[1:]:
            t = times(plan, gpu, d)
            if t:
                out.append(f"| {label} | {name} | {d} | {fmt_s(t['cal'])} | {fmt_s(t['work'])} | "
                           f"{fmt_s(t['dense'])} | {fmt_s(t['seq'])} |")
            else:
                out.append(f"| {label} | {name} | {d} | {formula(plan, d)} | | | |")
    out += ["", "### Memory per step", "",
            "Host: what the `armor-convert` process and its workers hold at the peak step — the runtime (~0.6 GB), "
            "one decoder layer (fp32 when calibrating on CPU, bf16 when the GPU holds the fp32 copy), the two "
            "activation buffers (nsamples × seqlen × hidden each; spilled: one sample of each), one sample's "
            "forward temporaries (CPU calibration), the layer's statistics (h; XᵀX for SparseGPT), the queue of "
            "2 × slots jobs' inputs (bf16 W + h, + XᵀX), per worker process its runtime, its job's inputs and, on CPU, "
            "the solve (its fp32 W + working set, as in the GPU table below), and the layer's output step "
            "(its fp32 results read back + the bf16 shard). Ray's object store keeps the queued inputs once more "
            "on the head node (not counted).", ""]
    for where, slots, cpu in ((f"this machine ({m['threads']} CPU workers)", m["threads"], True),
                              ("the driver host of an 8-GPU node (8 GPU workers)", 8, False)):
        comps = None
        rows = []
        for plan in PLANS:
            for act in ("ram fp32", "disk bf16"):
                c = host_memory(plan, act, slots, cpu, solve_peak(plan, cpu1, cpu_all))
                comps = list(c)
                rows.append(f"| {plan[0]} | {act} | " + " | ".join(gb(v) for v in c.values())
                            + f" | **{gb(sum(c.values()))}** |")
        out += [f"Host GB, {where}:", "", "| plan | activations | " + " | ".join(comps) + " | total |",
                "|---|---|" + "--:|" * (len(comps) + 1), *rows, ""]
    out += ["GPU GB per device (one calibration step: the layer in fp32 + one sample's fp32 activations, SDPA "
            "attention, + XᵀX accumulators for SparseGPT; one solve: (4 + peak bytes per weight) × 28672×8192, the largest "
            "linear: its fp32 W + the working set; for SparseGPT 12·N·K + 20·K² from its code (W, XᵀX and the "
            "factors) at its largest, down_proj — measured on CUDA when there is one, else the CPU's working set as the estimate):", "",
            "| plan | calibration step | largest solve | source of the solve figure |", "|---|--:|--:|---|"]
    for plan in PLANS:
        cal, sol = gpu_memory(plan, solve_peak(plan, cuda or cpu1, cuda or cpu_all))
        out.append(f"| {plan[0]} | {gb(cal)} | {gb(sol)} | {'CUDA' if cuda else 'CPU working set (no GPU here)'} |")
    out += ["", "### Disk", "",
            "GB. Output: values bf16 (N·K/2 × 2 B), bitmask N·K/8, B blocks (N+K)·b in bf16, embeddings and lm_head "
            "dense. Work directory: every finished job (values and B blocks fp32, bitmask), the statistics of every "
            "layer (h; XᵀX K² fp32 per linear for SparseGPT), and with `--activations disk --activation-dtype model` "
            "the two spilled buffers. `checks.disk_needed` is what the converter demands free up front.", "",
            "| plan | activations | output | finished jobs | statistics | activations | total | checks.disk_needed |",
            "|---|---|--:|--:|--:|--:|--:|--:|"]
    need = checks.disk_needed(P_MODEL * L70["elem"], torch.bfloat16)
    for plan in PLANS:
        for act in ("ram fp32", "disk bf16"):
            d = disk(plan, act)
            out.append(f"| {plan[0]} | {act} | " + " | ".join(gb(v) for v in d.values())
                       + f" | **{gb(sum(d.values()))}** | {gb(need)} |")
    out += ["", f"Measured in {m['wall'] / 60:.1f} min."]
    return "\n".join(out + footer(m["load"], m["command"]))


def solve_peak(plan: tuple, armor_rate: dict | None, sg_rate: dict | None) -> float | None:
    """Bytes of the plan's largest 70B solve: its fp32 W (and XᵀX) + the working set, i.e. (4 + measured
    peak bytes per weight) × N·K (ARMOR, largest measured shape), or SparseGPT's from its code."""
    if plan[1] == "sparsegpt":
        return max(4 * n * k + 4 * k * k + sparsegpt_bytes(n, k) for n, k in LINEARS.values())
    bpw = next((r["bytes_per_weight"] for r in armor_rate["rows"] if r["solver"] == plan[3]
                and r["shape"] == ARMOR_SHAPES[-1]), None) if armor_rate else None
    return None if bpw is None else (4 + bpw) * max(n * k for n, k in LINEARS.values())


def formula(plan: tuple, d: int) -> str:
    """The GPU time as a formula with its known coefficients (the rates are the unknowns)."""
    _, method, preset, solver = plan
    flops = L70["layers"] * calib_flops(preset, method == "sparsegpt")
    if method == "sparsegpt":
        nk = L70["layers"] * sum(n * k for n, k in LINEARS.values())
        fl = L70["layers"] * sum(sparsegpt_flops(n, k) for n, k in LINEARS.values())
        solves = f"({nk:.3g}·α + {fl:.3g} FLOP / R + g·K per linear) / {d}"
    else:
        wi = L70["layers"] * PRESETS[preset]["iters"] * sum(n * k for n, k in LINEARS.values())
        solves = f"{wi / d:.3g}·r ns + setup"
    return (f"not measured (no GPU): calibration {flops:.3g} FLOP / R; solves {solves} per device "
            f"(R, r, α, g: the GPU's fp32 FLOP/s and solve rates)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=2, help="ARMOR iterations per measurement (>= 2)")
    p.add_argument("--doc", help="write the section 'plan_70b' into this file (docs/scale.md)")
    args = p.parse_args()
    cfg_args = argparse.Namespace(exact_groups_per_tile=16, lr=1e-4, seed=0)
    load, started, threads = os.getloadavg()[0], time.perf_counter(), os.cpu_count() or 1
    print(f"load average at start: {os.getloadavg()}", flush=True)
    rates = {}
    for key, n_threads in (("cpu_1", 1), ("cpu_all", threads)):
        torch.set_num_threads(n_threads)
        warm_up(cfg_args)
        rates[key] = {"rows": measure_armor("cpu", args.iters, cfg_args)}
        gflops = measure_gflops("cpu")
        rates[key].update(sparsegpt=measure_sparsegpt("cpu", gflops), gflops=gflops)
    if torch.cuda.is_available():
        gflops = measure_gflops("cuda")
        rates["cuda"] = {"rows": measure_armor("cuda", args.iters, cfg_args), "gflops": gflops,
                         "sparsegpt": measure_sparsegpt("cuda", gflops)}
    # with one single-thread worker per core, the driver still calibrates with all threads
    rates["cpu_1"]["gflops"] = rates["cpu_all"]["gflops"]
    m = dict(rates=rates, iters=args.iters, threads=threads, load=load, wall=time.perf_counter() - started,
             command=shlex.join(["python", "-m", "benchmarks.scale_plan", *sys.argv[1:]]))
    text = markdown(m)
    print(text)
    if args.doc:
        write_section(args.doc, "plan_70b", text)
        print(f"wrote section 'plan_70b' of {args.doc}")


if __name__ == "__main__":
    main()
