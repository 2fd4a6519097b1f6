"""Dense vs sequential calibration on the default model: `python -m benchmarks.calibration_order` -> docs/results.md.

Dense: every layer's statistics come from the dense model's activations (the official ARMOR code).
Sequential: layer i+1's statistics come from the outputs of the already-compressed layer i
(SparseGPT's reference, llm-compressor's default). Wanda, SparseGPT and ARMOR (b = 64, the default
preset's 100 iterations), each both ways, from the same calibration samples, through
`armor-convert`'s command line; perplexity with the results table's protocol. Checkpoints and
perplexities are reused only when their recorded settings match (as in benchmarks.results).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from converters.commands.default_model import default_model_dir
from converters.conversion.report import REPORT_FILE
from converters.commands.reuse import convert_once

from .common import footer, write_section
from .results import cached_ppl, convert_argv

METHODS = [("wanda", "wanda", None), ("sparsegpt", "sparsegpt", None), ("armor-b64", "armor", 64)]


def run(args, load: float) -> list[dict]:
    dense = default_model_dir()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = [{"label": "dense", "calibration": "–", "ppl": cached_ppl(dense, work / f"dense.ppl-{args.windows}.json",
                                                                      {"dense": str(dense)}, args.windows).ppl}]
    for label, method, b in METHODS:
        for order in ("dense", "sequential"):
            out = work / f"{label}-{order}"
            argv = convert_argv(dense, out, work, method, b, False, {}, args, calibration=order)
            if order == "sequential":  # its statistics depend on the method: no statistics shared across rows
                i = argv.index("--stats-dir")
                argv[i + 1] = str(work / f"stats-{label}-sequential")
            convert_once(argv)
            rep = json.loads((out / REPORT_FILE).read_text())
            r = cached_ppl(out, work / f"{label}-{order}.ppl-{args.windows}.json", {"argv": argv}, args.windows)
            rows.append({"label": label, "calibration": order, "ppl": r.ppl, "tokens": r.tokens,
                         "seconds": rep["seconds"], "loss": rep["mean_loss_end"]})
            print(f"{label} {order}: ppl {r.ppl:.3f}, {rep['seconds']:.0f} s", flush=True)
            write_section(args.doc, "calibration_order", markdown(rows, args, load))  # each row as it comes
    return rows


def markdown(rows: list[dict], args, load: float) -> str:
    dense = rows[0]["ppl"]
    lines = ["## Dense vs sequential calibration", "",
             f"SmolLM2-135M-Instruct, {args.nsamples} × {args.seqlen} calibration tokens (the same samples for every "
             f"row), perplexity on the first {args.windows} 2048-token windows of the wiki test split, fp32 "
             f"(dense model: {dense:.3f}). **Dense**: statistics of every layer from the dense model's activations. "
             "**Sequential**: layer i+1's statistics from the outputs of the compressed layer i. Conversion seconds "
             "include the calibration pass, which sequential calibration runs once per method (dense statistics "
             "are computed once and shared by the rows that read the same ones).", "",
             f"Rows: {len(rows) - 1} of {2 * len(METHODS)}.", "",
             "| method | calibration | ppl | gap to dense | mean rel. proxy loss | conversion s |",
             "|---|---|---|---|---|---|"]
    for r in rows[1:]:
        lines.append(f"| {r['label']} | {r['calibration']} | {r['ppl']:.3f} | {r['ppl'] - dense:+.3f} | "
                     f"{r['loss']:.4f} | {r['seconds']:.0f} |")
    cmd = (f"python -m benchmarks.calibration_order --windows {args.windows} --iters {args.iters} "
           f"--nsamples {args.nsamples} --seqlen {args.seqlen}")
    return "\n".join(lines + footer(load, cmd))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="out/bench-calibration-order", help="checkpoints, statistics, perplexities")
    p.add_argument("--windows", type=int, default=8, help="score the first N windows of the wiki test split")
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc", default="docs/results.md")
    args = p.parse_args()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = run(args, load)
    (Path(args.work) / "rows.json").write_text(json.dumps(rows, indent=2))
    write_section(args.doc, "calibration_order", markdown(rows, args, load))
    print(markdown(rows, args, load))
    print(f"took {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
