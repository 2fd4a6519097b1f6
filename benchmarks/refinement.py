"""Refinement on the default model: `python -m benchmarks.refinement` -> docs/results.md (section "refinement").

Each method at the default preset without and with `--refine block`, ARMOR's refinement variants
(inputs, tuned parameters, steps) and ARMOR with int8 kept values (`--scheme W8A16`, whose solves
differ: a work directory of its own), all scored with the results protocol (wiki test, 2048-token
windows, fp32). A method's rows share one work directory, so its refined rows reuse its solves
(with dense statistics the solves do not depend on refinement) and differ only in the refinement;
conversion seconds are counted per stage from the reports: the solves (Σ of the jobs' seconds) and
the refinement (Σ of the layers' seconds), the calibration pass excluded from both.

``--timing N`` measures instead what a user waits for: whole `armor-convert --preset default` runs on the
first N decoder layers (the calibration pass stops after the last one, so the cost scales with N),
fresh directories each time, without and with refinement, alternating over ``--rounds`` on an idle
machine -> docs/results.md (section "refinement_time").
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from converters.commands.default_model import default_model_dir
from converters.commands.reuse import convert_once
from converters.conversion.driver import PRESETS
from converters.conversion.report import REPORT_FILE

from .common import IdleGuard, footer, publish, write_section
from .results import cached_ppl

# (label, method, extra armor-convert options); the refinement options are the defaults unless given
RUNS = [
    ("sparsegpt", "sparsegpt", ["--refine", "none"]),
    ("sparsegpt + refine", "sparsegpt", ["--refine", "block"]),
    ("armor", "armor", ["--refine", "none"]),
    ("armor + refine", "armor", ["--refine", "block"]),
    ("armor + refine, mixed inputs", "armor", ["--refine", "block", "--refine-inputs", "mixed"]),
    ("armor + refine, sequential inputs", "armor", ["--refine", "block", "--refine-inputs", "sequential"]),
    ("armor + refine, blocks only", "armor", ["--refine", "block", "--refine-params", "blocks"]),
    # int8 kept values (issue 20's quality target: within 1 % of the bf16 row above, same calibration)
    ("armor W8A16", "armor", ["--refine", "none", "--scheme", "W8A16"]),
    ("armor W8A16 + refine", "armor", ["--refine", "block", "--scheme", "W8A16"]),
]


def run(args) -> list[dict]:
    dense = default_model_dir()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    r = cached_ppl(dense, work / f"dense.ppl-{args.windows}.json", {"dense": str(dense)}, args.windows)
    rows = [{"label": "dense", "ppl": r.ppl, "tokens": r.tokens}]
    runs = RUNS + [(f"armor + refine, {s} steps", "armor", ["--refine", "block", "--refine-steps", str(s)])
                   for s in args.steps]
    for label, method, extra in runs:
        if args.only and label not in args.only:
            continue
        slug = label.replace(" + ", "-").replace(", ", "-").replace(" ", "-")
        out = work / slug
        scheme = extra[extra.index("--scheme") + 1].lower() if "--scheme" in extra else None
        wd = work / (f"{method}-{scheme}.work" if scheme else f"{method}.work")  # the scheme changes the solves
        argv = [str(dense), str(out), "--method", method, "--preset", "default", "--seed", str(args.seed),
                "--work-dir", str(wd), "--keep-work", "--workers", str(args.workers), *extra]
        convert_once(argv)
        rep = json.loads((out / REPORT_FILE).read_text())
        r = cached_ppl(out, work / f"{slug}.ppl-{args.windows}.json", {"argv": argv}, args.windows)
        refined = rep.get("refinement", [])
        rows.append({"label": label, "method": method, "argv": argv, "ppl": r.ppl, "tokens": r.tokens,
                     "solve_s": sum(j["seconds"] for j in rep["layers"]),
                     "refine_s": sum(x["seconds"] for x in refined),
                     "held_start": sum(x["held_error_start"] for x in refined) / len(refined) if refined else None,
                     "held_end": sum(x["held_error_end"] for x in refined) / len(refined) if refined else None,
                     "steps": rep.get("refine", {}).get("steps")})
        print(f"{label}: ppl {r.ppl:.3f}, solves {rows[-1]['solve_s']:.0f} s, refinement {rows[-1]['refine_s']:.0f} s",
              flush=True)
    return rows


def markdown(rows: list[dict], args, load: float) -> str:
    dense = rows[0]["ppl"]
    gap = {r["label"]: r["ppl"] - dense for r in rows}
    one_shot = [r for r in rows[1:] if "refine" not in r["label"] and r["method"] != "armor"]
    best = min(one_shot, key=lambda r: r["ppl"]) if one_shot else None
    lines = ["## Refinement: each compressed decoder layer tuned against the dense layer's output", "",
             f"SmolLM2-135M-Instruct, the default preset (64 × 512 calibration tokens; ARMOR b = 64, 100 exact "
             f"iterations; SparseGPT with its default sequential statistics, ARMOR with dense ones). Refinement "
             f"(`--refine block`): Adam on S's kept values and the blocks (masks fixed), the layer's output against "
             f"the dense layer's, {args.holdout_note}. Perplexity: wiki test split, first {args.windows} 2048-token "
             f"windows ({rows[0]['tokens']} tokens scored), fp32; dense {dense:.3f}.", "",
             "| run | ppl | gap to dense | gap / best one-shot's | held-back output error, start → end | "
             "solve s | refine s |",
             "|---|--:|--:|--:|---|--:|--:|"]
    for r in rows[1:]:
        rel = f"{gap[r['label']] / gap[best['label']]:.2f}×" if best else "–"
        held = f"{r['held_start']:.4f} → {r['held_end']:.4f}" if r["held_start"] is not None else "–"
        lines.append(f"| {r['label']} | {r['ppl']:.3f} | {gap[r['label']]:+.3f} | {rel} | {held} | "
                     f"{r['solve_s']:.0f} | {r['refine_s']:.0f} |")
    pair = {r["label"]: r for r in rows}
    if "armor + refine" in pair and "sparsegpt + refine" in pair:
        lines += ["", f"With the same refinement, ARMOR's gap to dense is "
                      f"{gap['armor + refine'] / gap['sparsegpt + refine']:.2f}× SparseGPT's."]
    for plain, w8 in (("armor", "armor W8A16"), ("armor + refine", "armor W8A16 + refine")):
        if plain in pair and w8 in pair:
            lines += ["", f"{w8}: perplexity {pair[w8]['ppl'] / pair[plain]['ppl']:.4f}× {plain}'s (int8 kept values, "
                          "a scale per output row; same calibration samples)."]
    lines += ["", "Held-back output error: ‖layer_c(x) − y‖² / ‖y − x‖² on the calibration samples refinement does "
                  "not train on, mean over layers (the state kept is the best of these checks). Seconds are the sums "
                  "of the solve jobs' and of the layers' refinement times, as each run's report recorded them. With dense statistics (ARMOR) a "
                  "method's refined rows reuse the unrefined row's solves from its work directory (so those seconds "
                  "may come from an earlier run, on another day's machine load); with sequential ones (SparseGPT) "
                  "every row solves anew, since a layer's statistics come from the refined layers before it. What refinement adds to the wall time of a "
                  "conversion is measured apart, below (`--timing`)."]
    lines += footer(load, shlex.join(["python", "-m", "benchmarks.refinement", *args.argv]))
    return "\n".join(lines)


def timing(args) -> list[dict[str, float]]:
    """Wall seconds of fresh default-preset conversions of the first ``args.timing`` layers, --refine none and
    block in turn (the order swapped every other round), one dict per round."""
    root = Path(args.work) / "timing"
    root.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("armor-convert")
    rounds = []
    for r in range(args.rounds):
        secs = {}
        for mode in ("none", "block") if r % 2 == 0 else ("block", "none"):
            with tempfile.TemporaryDirectory(dir=root) as tmp:  # ours: removed with everything in it
                t0 = time.perf_counter()
                subprocess.run([exe, str(default_model_dir()), str(Path(tmp) / "out"), "--preset", "default",
                                "--layers", f"0-{args.timing - 1}", "--workers", str(args.workers),
                                "--seed", str(args.seed), "--refine", mode], check=True)
                secs[mode] = time.perf_counter() - t0
            print(f"round {r + 1}, --refine {mode}: {secs[mode]:.0f} s", flush=True)
        rounds.append(secs)
    return rounds


def timing_markdown(rounds: list[dict[str, float]], args) -> str:
    """The timing table; the ratio is the median of the rounds' ratios."""
    ratio = statistics.median(s["block"] / s["none"] for s in rounds)
    lines = ["## Refinement: what it adds to a conversion's wall time", "",
             f"`armor-convert <default model> OUT --preset default --layers 0-{args.timing - 1} --workers "
             f"{args.workers} --refine none|block`: whole runs (calibration pass, solves, refinement, writing), fresh "
             f"directories each time, the two settings in turn, the order swapped every other round. The first "
             f"{args.timing} of the model's 30 decoder layers: the pass stops after the last compressed layer, so "
             "every stage scales with the layer count.", "",
             "| round | `--refine none` s | `--refine block` s | block / none |", "|--:|--:|--:|--:|"]
    lines += [f"| {i + 1} | {s['none']:.0f} | {s['block']:.0f} | {s['block'] / s['none']:.2f} |"
              for i, s in enumerate(rounds)]
    lines += ["", f"Median ratio over rounds: **{ratio:.2f}×**."]
    return "\n".join(lines + footer(args.load, shlex.join(["python", "-m", "benchmarks.refinement", *args.argv])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="out/bench-refine", help="checkpoints, work directories, perplexities")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="armor-convert --workers (solves at once)")
    p.add_argument("--steps", type=int, nargs="*", default=[], help="also ARMOR refined with these step counts")
    p.add_argument("--only", nargs="*", help="run only these labels")
    p.add_argument("--timing", type=int, metavar="N", help="time whole conversions of the first N layers instead")
    p.add_argument("--rounds", type=int, default=2, help="--timing: conversions of each kind, alternating")
    p.add_argument("--allow-loaded", action="store_true", help="--timing: measure even on a loaded machine (flagged)")
    p.add_argument("--doc", default="docs/results.md")
    args = p.parse_args()
    args.argv = sys.argv[1:]
    if args.timing:
        args.load = IdleGuard(args.allow_loaded, own_threads=args.workers).start()
        rounds = timing(args)
        return publish(args, "refinement_time", lambda: timing_markdown(rounds, args))
    from converters.conversion.refine import RefineOptions

    d = RefineOptions().for_samples(PRESETS["default"]["nsamples"])
    args.holdout_note = (f"{d.steps} steps of {d.batch} samples, learning rate {d.lr} × each tensor's RMS, linearly "
                         f"decayed; {d.holdout} samples held back and the best state on them kept")
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = run(args)
    (Path(args.work) / "refinement.json").write_text(json.dumps(rows, indent=2))
    write_section(args.doc, "refinement", markdown(rows, args, load))
    print(markdown(rows, args, load))
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
