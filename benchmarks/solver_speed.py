"""ARMOR continuous-step solvers head to head: the reference "adam" against "exact".

Both run on the same layer from the same NoWag-P start. Reported per layer: loss against wall time
for each, seconds per iteration, and the speedup = (adam's time for its whole budget) / (the
exact solver's time to reach adam's final loss). Usage, from the repository root:

    python -m benchmarks.solver_speed --threads 1 --out solver_speed.json
    python -m benchmarks.solver_speed --large            # adds 4096x4096 and 11008x4096
    python -m benchmarks.solver_speed --stats layers.pt  # real layers: torch.save({name: (W, h)})
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from converters.methods import LayerStats, MethodConfig, get_method

SMALL = ["576x576", "1536x576", "576x1536"]
LARGE = ["4096x4096", "11008x4096"]


def synthetic_layer(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian weight with a few heavy input columns and log-normal h, like real LLM linears."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    heavy = torch.randperm(k, generator=g)[: max(1, k // 100)]
    w[:, heavy] *= 8.0
    h = torch.exp(1.5 * torch.randn(k, generator=g))
    return w, h


def trace_run(w: torch.Tensor, h: torch.Tensor, cfg: MethodConfig) -> dict:
    """Run armor once, recording (seconds since start, relative loss) at every iteration."""
    points: list[list[float]] = []
    start = time.perf_counter()
    res = get_method("armor")(w, LayerStats(h=h, xtx=None, ntokens=0), cfg,
                              lambda it, loss: points.append([time.perf_counter() - start, loss]))
    total = time.perf_counter() - start
    return {"loss_start": res.loss_start, "loss_end": res.loss_end, "iters": res.iters,
            "seconds": total, "sec_per_iter": total / max(res.iters, 1),
            "trace": [[0.0, res.loss_start]] + points}


def compare(name: str, w: torch.Tensor, h: torch.Tensor, args: argparse.Namespace) -> dict:
    """Both solvers on one layer; early stopping is off so each spends its whole budget."""
    base = dict(block_size=args.block_size, seed=args.seed, rtol=0.0, lr=args.lr)
    adam = trace_run(w, h, MethodConfig(solver="adam", iters=args.adam_iters, patience=args.adam_iters + 1, **base))
    exact = trace_run(w, h, MethodConfig(solver="exact", iters=args.exact_iters, patience=args.exact_iters + 1,
                                         groups_per_tile=args.exact_groups_per_tile, **base))
    target = adam["loss_end"]
    reach = next((t for t, loss in exact["trace"] if loss <= target), None)
    out = {"layer": name, "shape": list(w.shape), "block_size": args.block_size,
           "exact_groups_per_tile": args.exact_groups_per_tile, "adam": adam, "exact": exact,
           "target_loss": target, "exact_seconds_to_target": reach,
           "speedup": adam["seconds"] / reach if reach else None}
    print_side_by_side(out)
    return out


def print_side_by_side(res: dict) -> None:
    """Loss of both solvers at a few matching wall times, then the summary line."""
    ad, ex = res["adam"], res["exact"]
    print(f"\n== {res['layer']} {res['shape'][0]}x{res['shape'][1]} b={res['block_size']} "
          f"(exact: {res['exact_groups_per_tile']} group(s)/tile/iter): NoWag-P loss {ad['loss_start']:.5f}")
    print(f"{'seconds':>9} {'adam loss':>11} {'exact loss':>11}")
    horizon = max(ad["seconds"], ex["seconds"])
    for frac in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0):
        t = frac * horizon
        la = min((loss for s, loss in ad["trace"] if s <= t), default=ad["loss_start"])
        le = min((loss for s, loss in ex["trace"] if s <= t), default=ex["loss_start"])
        print(f"{t:9.2f} {la:11.5f} {le:11.5f}")
    speed = f"{res['speedup']:.1f}x" if res["speedup"] else "not reached"
    print(f"adam: {ad['iters']} it, {ad['sec_per_iter'] * 1e3:.1f} ms/it, final {ad['loss_end']:.5f} | "
          f"exact: {ex['iters']} it, {ex['sec_per_iter'] * 1e3:.1f} ms/it, final {ex['loss_end']:.5f} | "
          f"exact reaches adam's final loss in {res['exact_seconds_to_target']} s -> speedup {speed}")


def main() -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SMALL), help="comma-separated NxK synthetic layers")
    p.add_argument("--large", action="store_true", help=f"also run {', '.join(LARGE)}")
    p.add_argument("--stats", help="torch.save'd {name: (W, h)} of real layers (replaces the synthetic ones)")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--adam-iters", type=int, default=200)
    p.add_argument("--exact-iters", type=int, default=50)
    p.add_argument("--exact-groups-per-tile", type=int, default=1,
                   help="sparse-core updates per tile per iteration for the exact solver (adam keeps the reference's 1)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the default keeps timings comparable)")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.stats:
        layers = {name: (w.float(), h.float()) for name, (w, h) in torch.load(args.stats).items()}
    else:
        shapes = args.shapes.split(",") + (LARGE if args.large else [])
        layers = {s: synthetic_layer(*map(int, s.split("x")), seed=args.seed) for s in shapes}
    results = [compare(name, w, h, args) for name, (w, h) in layers.items()]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"threads": args.threads, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
