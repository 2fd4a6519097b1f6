"""ARMOR continuous-step solvers head to head: the reference "adam" against "exact".

Both run on the same layer from the same NoWag-P start, early stopping off. Reported per layer:
loss against wall time for each, seconds per iteration, and the speedup = (adam's time for its
whole budget) / (the exact solver's time to reach adam's final loss). Adam keeps the reference's
1 mask group per tile per iteration; exact uses the converter's default (16). Usage, from the
repository root:

    python -m benchmarks.solver_speed --threads 1 --out solver_speed.json
    python -m benchmarks.solver_speed --large            # adds 4096x4096 and 11008x4096
    python -m benchmarks.solver_speed --stats layers.pt  # real layers: torch.save({name: (W, h)})
    python -m benchmarks.solver_speed --default-model-layer 0   # q/k/gate/down of the default model
    python -m benchmarks.solver_speed --sweep            # s/it against N, K and b (converter cost)

The command behind docs/results.md (section "solver_speed", written with --doc):

    python -m benchmarks.solver_speed --threads 1 --default-model-layer 0 --large --sweep \
        --doc docs/results.md --out out/solver_speed.json
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from converters.conversion.methods import LayerStats, get_method
from converters.conversion.methods.armor import ArmorOptions

from .common import write_section
from .solver_report import markdown

SMALL = ["576x576", "1536x576", "576x1536"]
LARGE = ["4096x4096", "11008x4096"]
REAL = ["self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj"]
# Cost sweep, synthetic layers: (NxK, b, iterations). N and K growth at b=64, then b on 4096x4096.
SWEEP = [("576x576", 64, 10), ("1536x576", 64, 10), ("576x1536", 64, 10), ("1536x1536", 64, 10),
         ("4096x4096", 16, 3), ("4096x4096", 32, 3), ("4096x4096", 64, 3), ("4096x4096", 128, 3)]
STATS_DIR = "out/bench-results/stats"     # where benchmarks.results keeps the default model's statistics


def synthetic_layer(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian weight with a few heavy input columns and log-normal h, like real LLM linears."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k ** 0.5
    heavy = torch.randperm(k, generator=g)[: max(1, k // 100)]
    w[:, heavy] *= 8.0
    h = torch.exp(1.5 * torch.randn(k, generator=g))
    return w, h


def default_model_layers(index: int, stats_dir: str) -> tuple[dict, str]:
    """{name: (W, h)} for REAL linears of decoder layer `index`, and where h came from.

    h is read from the converter's statistics file layer_{index:04d}.pt in stats_dir when there is
    one; otherwise it is computed by a short forward pass (8 x 256 wiki tokens).
    """
    from safetensors import safe_open

    from converters.commands.default_model import default_model_dir

    model_dir = default_model_dir()
    path = Path(stats_dir) / f"layer_{index:04d}.pt"
    if path.is_file():
        h = {n: s["h"] for n, s in torch.load(path)["stats"].items()}
        settings = path.with_name("settings.json")
        cal = json.loads(settings.read_text()) if settings.is_file() else {}
        h_from = f"{path} ({cal.get('nsamples', '?')}x{cal.get('seqlen', '?')} {cal.get('calib', '?')} tokens)"
    else:
        h, h_from = quick_stats(model_dir, index), "a quick forward pass over 8x256 wiki tokens"
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        layers = {f"L{index}.{n.split('.')[-1]}": (f.get_tensor(f"model.layers.{index}.{n}.weight").float(),
                                                    h[n].float()) for n in REAL}
    return layers, f"the default model's decoder layer {index} (L{index}.*), real weights, h from {h_from}"


def quick_stats(model_dir: Path, index: int) -> dict[str, torch.Tensor]:
    """h of every linear of decoder layer `index` from 8 calibration windows of 256 tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from converters.conversion.calibration import capture_layer_inputs, collect_layer_stats, decoder_layers
    from converters.data import calibration_samples

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    samples = calibration_samples(AutoTokenizer.from_pretrained(model_dir), "wiki", 8, 256, 0)
    inputs, kwargs = capture_layer_inputs(model, samples, "cpu")
    for layer in list(decoder_layers(model))[: index + 1]:
        inputs, stats, _ = collect_layer_stats(layer, inputs, kwargs, "cpu", need_xtx=False)
    return {n: s.h for n, s in stats.items()}


def trace_run(w: torch.Tensor, h: torch.Tensor, cfg: ArmorOptions) -> dict:
    """Run armor once, recording (seconds since start, relative loss) at every iteration.

    sec_per_iter is the steady-state cost, iterations 2..n (the first one also pays the NoWag-P
    start and the tiling; that part is `setup`).
    """
    points: list[list[float]] = []
    start = time.perf_counter()
    res = get_method("armor")(w, LayerStats(h=h, xtx=None, ntokens=0), cfg,
                              lambda it, loss: points.append([time.perf_counter() - start, loss]))
    total = time.perf_counter() - start
    steady = (points[-1][0] - points[0][0]) / (len(points) - 1) if len(points) > 1 else total
    return {"loss_start": res.loss_start, "loss_end": res.loss_end, "iters": res.iters,
            "seconds": total, "sec_per_iter": steady, "setup": points[0][0] - steady if points else total,
            "trace": [[0.0, res.loss_start]] + points}


def solver_cfg(solver: str, iters: int, b: int, args: argparse.Namespace) -> ArmorOptions:
    groups = 1 if solver == "adam" else args.exact_groups_per_tile
    return ArmorOptions(solver=solver, iters=iters, patience=iters + 1, rtol=0.0, block_size=b,
                        groups_per_tile=groups, lr=args.lr, seed=args.seed)


def compare(name: str, w: torch.Tensor, h: torch.Tensor, b: int, adam_iters: int, exact_iters: int,
            args: argparse.Namespace) -> dict:
    """Both solvers on one layer; early stopping is off so each spends its whole budget."""
    adam = trace_run(w, h, solver_cfg("adam", adam_iters, b, args))
    exact = trace_run(w, h, solver_cfg("exact", exact_iters, b, args))
    target = adam["loss_end"]
    reach = next((t for t, loss in exact["trace"] if loss <= target), None)
    out = {"layer": name, "shape": list(w.shape), "block_size": b,
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
          f"exact reaches adam's final loss in {res['exact_seconds_to_target']} s -> speedup {speed}", flush=True)


def cost_sweep(args: argparse.Namespace) -> list[dict]:
    """Seconds per iteration of both solvers over SWEEP (synthetic layers: cost does not depend on values)."""
    rows = []
    for shape, b, iters in SWEEP:
        w, h = synthetic_layer(*map(int, shape.split("x")), seed=args.seed)
        row = {"shape": list(w.shape), "block_size": b, "iters": iters}
        for solver in ("adam", "exact"):
            r = trace_run(w, h, solver_cfg(solver, iters, b, args))
            row[solver] = {"sec_per_iter": r["sec_per_iter"], "setup": r["setup"]}
        print(f"sweep {shape} b={b}: adam {row['adam']['sec_per_iter']:.3f} s/it, "
              f"exact {row['exact']['sec_per_iter']:.3f} s/it (setup {row['exact']['setup']:.2f} s)", flush=True)
        rows.append(row)
    return rows


def warm_up(args: argparse.Namespace) -> None:
    """One tiny run of each solver, so that one-off costs (lazy imports, allocator) hit no timing."""
    w, h = synthetic_layer(64, 64, seed=args.seed)
    for solver in ("adam", "exact"):
        trace_run(w, h, solver_cfg(solver, 2, 16, args))


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SMALL), help="comma-separated NxK synthetic layers")
    p.add_argument("--large", action="store_true", help=f"also run {', '.join(LARGE)}")
    p.add_argument("--stats", help="torch.save'd {name: (W, h)} of real layers (replaces the synthetic ones)")
    p.add_argument("--default-model-layer", type=int, metavar="I",
                   help=f"real layers {', '.join(REAL)} of the default model's decoder layer I (replaces the synthetic ones)")
    p.add_argument("--stats-dir", default=STATS_DIR, help="calibration statistics for --default-model-layer")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--adam-iters", type=int, default=200)
    p.add_argument("--exact-iters", type=int, default=50)
    p.add_argument("--large-block-size", type=int, default=128)
    p.add_argument("--large-adam-iters", type=int, default=40)
    p.add_argument("--large-exact-iters", type=int, default=10)
    p.add_argument("--exact-groups-per-tile", type=int, default=ArmorOptions().groups_per_tile,
                   help="sparse-core updates per tile per iteration for the exact solver (adam keeps the reference's 1)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="also measure s/it against N, K and b (SWEEP)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the default keeps timings comparable)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--doc", help="write the markdown section 'solver_speed' into this file (e.g. docs/results.md)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    warm_up(args)

    source = "synthetic layers (see below)"
    if args.default_model_layer is not None:
        layers, source = default_model_layers(args.default_model_layer, args.stats_dir)
    elif args.stats:
        layers = {name: (w.float(), h.float()) for name, (w, h) in torch.load(args.stats).items()}
        source = f"real layers from {args.stats}"
    else:
        layers = {f"synthetic {s}": synthetic_layer(*map(int, s.split("x")), seed=args.seed)
                  for s in args.shapes.split(",")}
    results = [compare(name, w, h, args.block_size, args.adam_iters, args.exact_iters, args)
               for name, (w, h) in layers.items()]
    for s in LARGE if args.large else []:
        w, h = synthetic_layer(*map(int, s.split("x")), seed=args.seed)
        results.append(compare(f"synthetic {s}", w, h, args.large_block_size, args.large_adam_iters,
                               args.large_exact_iters, args))
        del w, h
    sweep = cost_sweep(args) if args.sweep else []

    report = {"threads": args.threads, "load_average": [load, os.getloadavg()[0]], "layer_source": source,
              "wall_seconds": time.perf_counter() - started, "results": results, "sweep": sweep,
              "command": shlex.join(["python", "-m", "benchmarks.solver_speed", *sys.argv[1:]])}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.doc:
        write_section(args.doc, "solver_speed", markdown(report))
        print(f"wrote section 'solver_speed' of {args.doc}")
    return report


if __name__ == "__main__":
    main()
