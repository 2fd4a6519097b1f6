"""One linear layer, every way the plugin can run it: `python -m benchmarks.layer_speed`.

Why: the serving numbers mix attention, sampling and scheduling into the layer cost; this isolates
the GEMM at 7B-class shapes (N×K) and a few token counts, side by side in one process:

- dense: on CPU vLLM's own dense GEMM (``dispatch_cpu_unquantized_gemm``: oneDNN with the weight
  prepacked once, what the ``fold`` backend also runs); on CUDA F.linear;
- ARMOR 2:4: on CPU the ``sparse_cpu`` backend (S compressed, B_in/B_out as ``bmm``s inside one
  C++ op), prepared by the plugin's own ``prepare`` on a bare module; on CUDA
  ``torch.ops.armor.semi_structured``;
- ARMOR W8A16: the same with S's kept values rounded to int8, one float32 scale per row (the
  converter's ``--scheme W8A16``), B_in/B_out in the model dtype;
- core 2:4: the same without B_in/B_out (a baseline method's checkpoint).

On CPU each op rotates over enough copies of its weights that they come from DRAM, not the L3
cache, as in a model whose layers follow each other; each row also gives the bytes one call reads
and the bandwidth that makes, against the machine's read bandwidth measured here. Weights are
random (S with a random 2:4 mask, near-identity B blocks): speed does not depend on the values.
Times are the minimum over round-robin rounds of all ops (the least disturbed by other load on a
shared machine).

    python -m benchmarks.layer_speed                      # CPU, bf16, b=128, 1 and 2 threads -> docs/performance.md
    python -m benchmarks.layer_speed --switch             # decode kernel vs prefill path by token count
    python -m benchmarks.layer_speed --device cuda        # the CUDA 2:4 rows (sm80+)
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

import armor_vllm.kernels  # noqa: F401  (registers torch.ops.armor.*)
from armor_vllm.kernels import semi_structured, sparse_cpu
from converters.conversion.methods.quantize import quantize_rows

from .common import IdleGuard, doc_options, footer, publish


def random_layer(n: int, k: int, b: int, dtype, device, seed: int = 0):
    """(S with a random 2:4 mask, b_in [1, K/b, b, b], b_out [N/b, b, b]), all in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, k, generator=g) / k ** 0.5
    keep = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]  # 2 random positions per group of 4
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    s = s * mask
    b_in = torch.eye(b) + 0.01 * torch.randn(1, k // b, b, b, generator=g)
    b_out = torch.eye(b) + 0.01 * torch.randn(n // b, b, b, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (s, b_in, b_out)]


def l3_bytes() -> int:
    """The largest CPU cache (sysfs), 32 MiB if unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
    return max(sizes, default=32 * 2**20)


def read_bandwidth(threads: int) -> float:
    """GB/s of summing a 1 GiB fp32 tensor with ``threads`` threads (best of 5): the DRAM read ceiling."""
    torch.set_num_threads(threads)
    x = torch.ones(2**28)
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def cpu_ops(n: int, k: int, b: int, dtype, copies: int):
    """{name: (call(x, copy_index), bytes one call reads)} with ``copies`` weight sets each."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    def dense_layer(seed):
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
                                          .to(dtype), requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=True)  # exactly vLLM's unquantized CPU path
        return layer

    def sparse_layer(seed, blocks: bool, int8: bool = False):
        s, b_in, b_out = random_layer(n, k, b, dtype, "cpu", seed)
        scale = None
        if int8:
            q = quantize_rows(s.float())
            s, scale = q.codes, q.scale
        layer = torch.nn.Module()
        apply = sparse_cpu.prepare(layer, s, b_in if blocks else None, b_out if blocks else None, [n], scale)
        return layer, apply

    dense = [dense_layer(i) for i in range(copies)]
    # vLLM passes layer.weight (empty once prepacked; the weight itself where oneDNN has no bf16 matmul, e.g. AVX2)
    ops = {"dense": (lambda x, i: dense[i].cpu_linear(x, dense[i].weight, None), n * k * dtype.itemsize)}
    for name, blocks, int8 in (("ARMOR 2:4", True, False), ("ARMOR W8A16", True, True), ("core 2:4", False, False)):
        layers = [sparse_layer(i, blocks, int8) for i in range(copies)]
        ops[name] = (lambda x, i, layers=layers: layers[i][1](layers[i][0], x, None), param_bytes(layers[0][0]))
    return ops


def bench_cpu_threads(th: int, shapes: list[tuple[int, int]], tokens: list[int], args) -> tuple[list[dict], float]:
    """Every CPU row of one thread count, and the read bandwidth, in a fresh process (see bench_cpu)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_bench_cpu_threads, th, shapes, tokens, args).result()


def _bench_cpu_threads(th, shapes, tokens, args):
    torch.set_num_threads(th)
    return [r for n, k in shapes for r in bench_cpu(n, k, tokens, th, args)], read_bandwidth(th)


def bench_cpu(n: int, k: int, tokens: list[int], th: int, args) -> list[dict]:
    """Rows at the process's thread count ``th``. One process per thread count, as in a vLLM worker: vLLM's
    dense GEMM runs on the threads of the process's first oneDNN call (measured: after switching from 1 to 2
    threads in one process, fresh dense ops still ran on one, 38.7 ms at 4096×4096 and 256 tokens against
    19.7 ms in a process that set 2 threads first)."""
    dt = getattr(torch, args.dtype)
    copies = max(2, math.ceil(2 * l3_bytes() / (n * k * dt.itemsize * 0.56)))  # ≥ 2× the L3 per op
    rows = []
    with torch.inference_mode():
        ops = cpu_ops(n, k, args.block_size, dt, copies)
        for t in tokens:
            x = torch.randn(t, k, dtype=dt)
            ms = dict.fromkeys(ops, float("inf"))
            for _ in range(args.rounds):  # round-robin, so a burst of outside load hits every op alike
                for name, (f, _) in ops.items():
                    f(x, 0)  # warm-up (oneDNN primitive per M)
                    ms[name] = min(ms[name], 1e3 * _timed(lambda: [f(x, i) for i in range(copies)]) / copies)
            rows.append({"shape": f"{n}x{k}", "tokens": t, "threads": th, "ms": ms,
                         "bytes": {name: nb for name, (_, nb) in ops.items()}})
            print(f"{n}x{k} T={t} threads={th}: " + ", ".join(f"{k_} {v:.3f} ms" for k_, v in ms.items()),
                  flush=True)
    return rows


def time_ms(fn, min_run_time: float) -> float:
    """Minimum over blocked_autorange's blocks of the mean time per call, in ms (syncs CUDA itself)."""
    fn()  # warm-up: lazy init, cuBLAS/cuSPARSELt plan selection
    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return min(m.times) * 1e3


def bench_cuda(n: int, k: int, tokens: list[int], args) -> list[dict]:
    dev, dt, b = torch.device("cuda"), getattr(torch, args.dtype), args.block_size
    s, b_in, b_out = random_layer(n, k, b, dt, dev)
    w_dense = torch.randn(n, k, dtype=dt, device=dev) / k ** 0.5
    ops = {"dense": lambda x: F.linear(x, w_dense)}
    why = semi_structured.misfit(s, [n], per_shard=False) if semi_structured.available(dev) else "not sm80+"
    if why:
        print(f"{n}x{k}: no 2:4 rows: {why}", file=sys.stderr)
    else:
        for name, bi, bo in (("ARMOR 2:4", b_in, b_out), ("core 2:4", None, None)):
            layer = torch.nn.Module()
            apply = semi_structured.prepare(layer, s, bi, bo, [n])
            ops[name] = lambda x, layer=layer, apply=apply: apply(layer, x, None)
    rows = []
    with torch.inference_mode():
        for t in tokens:
            x = torch.randn(t, k, dtype=dt, device=dev)
            ms = dict.fromkeys(ops, float("inf"))
            for _ in range(args.rounds):
                for name, f in ops.items():
                    ms[name] = min(ms[name], time_ms(lambda f=f: f(x), args.min_run_time))
            rows.append({"shape": f"{n}x{k}", "tokens": t, "threads": "-", "ms": ms, "bytes": {}})
    return rows


def markdown(rows: list[dict], args, cmd: str, bandwidth: dict[int, float]) -> str:
    names = list(rows[0]["ms"])
    ideal = "bytes ×dense" if args.device == "cpu" else "FLOPs ×dense"
    head = ("| N×K | tokens | threads | " + " | ".join(f"{n} ms" + ("" if n == "dense" else " (×dense)")
                                                       for n in names) + " | GB/s ARMOR / W8A16 / dense |")
    isa = f"`sparse_cpu` ISA level {sparse_cpu.level()}" if args.device == "cpu" else "semi-structured"
    lines = [f"## Layer speed ({args.device}, {args.dtype}, b = {args.block_size}, {isa})", "", head,
             "|" + "---|" * (len(names) + 4)]
    for r in rows:
        cells = [f"{v:.3f}" if name == "dense" else f"{v:.3f} ({r['ms']['dense'] / v:.2f}×)"
                 for name, v in r["ms"].items()]
        gbs = (" / ".join(f"{r['bytes'][name] / r['ms'][name] / 1e6:.1f}" for name in ("ARMOR 2:4", "ARMOR W8A16", "dense"))
               if r["bytes"] else "–")
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['threads']} | " + " | ".join(cells) + f" | {gbs} |")
    if args.device == "cpu":
        shapes = sorted({r["shape"]: r for r in rows}.values(), key=lambda r: r["shape"])
        ratios = ", ".join(f"{r['shape']}: ARMOR {r['bytes']['ARMOR 2:4'] / r['bytes']['dense']:.3f}, "
                           f"W8A16 {r['bytes']['ARMOR W8A16'] / r['bytes']['dense']:.3f}, "
                           f"core {r['bytes']['core 2:4'] / r['bytes']['dense']:.3f}" for r in shapes)
        bw = ", ".join(f"{th} thread(s) {gb:.1f} GB/s" for th, gb in bandwidth.items())
        lines += ["", f"(×dense) = dense time / this time: above 1 is faster than vLLM's dense GEMM. Weight bytes per "
                      f"call, {ideal}: {ratios} (the speed-up ceiling of a memory-bound call). GB/s = weight bytes "
                      f"read per call / time; the machine's read bandwidth (summing 1 GiB): {bw}. Each op rotates "
                      "over enough weight copies to exceed twice the L3 cache; time per call is the minimum over "
                      f"{args.rounds} round-robin rounds."]
    return "\n".join(lines + footer(args.load, cmd))


def switch_point(n: int, k: int, args) -> None:
    """Print the decode kernel's and the prefill path's time per token count, to place PREFILL_MIN_TOKENS."""
    dt = getattr(torch, args.dtype)
    s, b_in, b_out = random_layer(n, k, args.block_size, dt, "cpu")
    values, bitmask = sparse_cpu.compress(s)
    op = getattr(torch.ops, f"armor_{sparse_cpu.level()}").linear
    torch.set_num_threads(max(args.threads))
    for t in (16, 32, 64, 128, 256):
        x = torch.randn(t, k, dtype=dt)
        best = {"kernel": float("inf"), "prefill": float("inf")}
        for _ in range(args.rounds):
            for name, pm in (("kernel", 10**9), ("prefill", 1)):
                best[name] = min(best[name], 1e3 * _timed(lambda: op(x, values, bitmask, b_in, b_out, None, [n], pm)))
        print(f"{n}x{k} T={t}: " + ", ".join(f"{a} {v:.2f} ms" for a, v in best.items()), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--tokens", default="1,4,16,256", help="comma-separated token counts (GEMM rows)")
    p.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts")
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="comma-separated NxK (out x in)")
    p.add_argument("--min-run-time", type=float, default=0.15, help="CUDA: seconds per measurement")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds over the ops; the minimum counts")
    p.add_argument("--switch", action="store_true", help="only print where the prefill path overtakes the kernel")
    doc_options(p)
    args = p.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    args.threads = [int(t) for t in args.threads.split(",")]
    args.load = IdleGuard(args.allow_loaded, own_threads=max(args.threads)).start()
    shapes = [tuple(map(int, shape.split("x"))) for shape in args.shapes.split(",")]
    if args.switch:
        return switch_point(*shapes[0], args)
    if args.device == "cpu":
        rows, bandwidth = [], {}
        for th in args.threads:
            rows_th, bandwidth[th] = bench_cpu_threads(th, shapes, tokens, args)
            rows += rows_th
        rows.sort(key=lambda r: [f"{n}x{k}" for n, k in shapes].index(r["shape"]))  # by shape, threads within
    else:
        bandwidth = {}
        rows = [r for n, k in shapes for r in bench_cuda(n, k, tokens, args)]
    cmd = "python -m benchmarks.layer_speed " + " ".join(sys.argv[1:])
    publish(args, f"layer_speed_{args.device}", lambda: markdown(rows, args, cmd.strip(), bandwidth))


if __name__ == "__main__":
    main()
