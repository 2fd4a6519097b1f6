"""One linear layer, every way the plugin can run it: `python -m benchmarks.layer_speed`.

Why: the serving numbers mix attention, sampling and scheduling into the layer cost; this isolates
the GEMM at 7B-class shapes (N×K) and a few token counts, side by side in one process:

- dense: F.linear with a dense W;
- fold: ``kernels.fold.fold_weight`` then F.linear (what the plugin does without 2:4 hardware);
- sandwich: ``torch.ops.armor.sandwich``, bmm(B_in) → dense S → bmm(B_out) (the unfolded path);
- core 2:4: S alone, without B_in/B_out (a baseline method's checkpoint): on CPU a dense F.linear
  (no 2:4 kernel exists there), on CUDA ``torch.ops.armor.semi_structured`` with b_in=b_out=None;
- ARMOR 2:4 (CUDA only): ``torch.ops.armor.semi_structured`` prepared by the plugin's
  ``kernels.semi_structured.prepare`` on a bare module.

Weights are random (S with a random 2:4 mask, near-identity B blocks): speed does not depend on the
values. Times are the minimum over torch.utils.benchmark blocks and over round-robin rounds of all
ops (the least disturbed by other load on a shared machine).

    python -m benchmarks.layer_speed                      # CPU, bf16, b=128 -> docs/performance.md
    python -m benchmarks.layer_speed --device cuda        # adds the 2:4 rows (sm80+)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

import armor_vllm.kernels  # noqa: F401  (registers torch.ops.armor.*)
from armor_vllm.kernels import fold, semi_structured

from .common import footer, write_section


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


def time_ms(fn, min_run_time: float) -> float:
    """Minimum over blocked_autorange's blocks of the mean time per call, in ms (syncs CUDA itself)."""
    fn()  # warm-up: lazy init, oneDNN/cuBLAS/cuSPARSELt plan selection
    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return min(m.times) * 1e3


def bench_shape(n: int, k: int, tokens: list[int], args) -> list[dict]:
    dev, dt, b = torch.device(args.device), getattr(torch, args.dtype), args.block_size
    s, b_in, b_out = random_layer(n, k, b, dt, dev)
    w_dense = torch.randn(n, k, dtype=dt, device=dev) / k ** 0.5
    w_fold = fold.fold_weight(s, b_in, b_out, [n]).to(dt)
    ops = {"dense": lambda x: F.linear(x, w_dense),
           "fold": lambda x: F.linear(x, w_fold),
           "sandwich": lambda x: torch.ops.armor.sandwich(x, s, b_in, b_out, None, [n])}
    if dev.type == "cuda":
        why = semi_structured.misfit(s, [n], per_shard=False) if semi_structured.available(dev) else "not sm80+"
        if why:
            print(f"{n}x{k}: no 2:4 rows: {why}", file=sys.stderr)
        else:
            for name, bi, bo in (("core 2:4", None, None), ("ARMOR 2:4", b_in, b_out)):
                layer = torch.nn.Module()
                apply = semi_structured.prepare(layer, s, bi, bo, [n])
                ops[name] = lambda x, layer=layer, apply=apply: apply(layer, x, None)
    else:
        ops["core 2:4"] = lambda x: F.linear(x, s)  # no 2:4 kernel on CPU: S runs dense, zeros included
    rows = []
    with torch.inference_mode():
        x = torch.randn(4, k, dtype=dt, device=dev)
        for name in ("sandwich", "ARMOR 2:4"):  # the factorised paths must compute the folded layer
            if name in ops:
                ref, y = ops["fold"](x).float(), ops[name](x).float()
                err = ((y - ref).norm() / ref.norm()).item()
                assert err < 2e-2, f"{n}x{k} {name}: relative error {err:.3g} against the fold"
        for t in tokens:
            x = torch.randn(t, k, dtype=dt, device=dev)
            ms = dict.fromkeys(ops, float("inf"))
            for _ in range(args.rounds):  # round-robin, so a burst of outside load hits every op alike
                for name, f in ops.items():
                    ms[name] = min(ms[name], time_ms(lambda f=f: f(x), args.min_run_time))
            rows.append({"shape": f"{n}x{k}", "tokens": t, "ms": ms})
            print(f"{n}x{k} T={t}: " + ", ".join(f"{k_} {v:.3f} ms" for k_, v in ms.items()), flush=True)
    return rows


def markdown(rows: list[dict], args, cmd: str) -> str:
    names = list(rows[0]["ms"])
    head = ("| N×K | tokens | " + " | ".join(f"{n} ms" + ("" if n == "dense" else " (×dense)") for n in names)
            + " | ideal ARMOR 2:4 FLOPs ×dense |")
    lines = [f"## Layer speed ({args.device}, {args.dtype}, b = {args.block_size})", "", head,
             "|" + "---|" * (len(names) + 3)]
    for r in rows:
        n, k = map(int, r["shape"].split("x"))
        ideal = 0.5 + (n + k) * args.block_size / (n * k)
        cells = [f"{v:.3f}" if name == "dense" else f"{v:.3f} ({v / r['ms']['dense']:.2f}×)"
                 for name, v in r["ms"].items()]
        lines.append(f"| {r['shape']} | {r['tokens']} | " + " | ".join(cells) + f" | {ideal:.3f} |")
    note = ("core 2:4 on CPU is S multiplied densely (zeros included): no 2:4 kernel exists on CPU, so it "
            "shows no speed-up by construction." if args.device == "cpu" else
            "core 2:4 and ARMOR 2:4 use PyTorch semi-structured sparse S "
            f"({'cuSPARSELt' if torch.backends.cusparselt.is_available() else 'CUTLASS'}).")
    lines += ["", f"Time per call: minimum over the blocks of torch.utils.benchmark's blocked_autorange "
                  f"(min_run_time {args.min_run_time} s) and over {args.rounds} round-robin rounds, "
                  f"{torch.get_num_threads()} torch threads; F.linear is plain PyTorch, not vLLM's prepacked oneDNN "
                  f"GEMM. {note} The ideal column is the FLOP ratio of a 2:4 S plus the two block-diagonal "
                  "factors, 0.5 + (N+K)·b/(N·K)."] + footer(args.load, cmd)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--tokens", default="1,16,256", help="comma-separated token counts (GEMM rows)")
    p.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="comma-separated NxK (out x in)")
    p.add_argument("--min-run-time", type=float, default=0.15, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=5, help="round-robin rounds over the ops; the minimum counts")
    p.add_argument("--doc", default="docs/performance.md", help="'' to skip writing")
    args = p.parse_args()
    args.load = os.getloadavg()[0]
    if args.device == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = [r for shape in args.shapes.split(",") for r in bench_shape(*map(int, shape.split("x")), tokens, args)]
    cmd = "python -m benchmarks.layer_speed " + " ".join(sys.argv[1:])
    md = markdown(rows, args, cmd.strip())
    if args.doc:
        write_section(args.doc, f"layer_speed_{args.device}", md)
    print(md)


if __name__ == "__main__":
    main()
