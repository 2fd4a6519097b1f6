"""`make bench`: every command whose output is a number in docs/, in dependency order.

Hours on a 2-core CPU (the results table alone makes ten checkpoints); each step reuses what an
earlier run finished with the same settings, so an interrupted `make bench` continues where it
stopped. Each command runs in its own process, as the docs name it, so the command printed under
a table is exactly what produced it. Not here: benchmarks.convert_memory, which compares checkouts
side by side (its rows name a commit).

    python -m benchmarks.run_all              # everything
    python -m benchmarks.run_all --list       # the commands, without running them
    python -m benchmarks.run_all --only results solver_speed
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from converters.commands.default_model import default_model_dir
from converters.commands.reuse import convert_once

PY = [sys.executable, "-m"]
# checkpoints for the serving table: speed does not depend on how well they were solved
PERF_ARMOR = ["out/perf/armor", "--preset", "quick", "--iters", "2", "--nsamples", "4", "--seqlen", "256"]
PERF_CORE = ["out/perf/core", "--method", "nowag-p", "--nsamples", "4", "--seqlen", "256", "--refine", "none"]


def steps(dense: str) -> dict[str, list[list[str]]]:
    """name -> commands; a command starting with 'armor-convert' is a conversion, reused when unchanged."""
    layer = [PY + ["benchmarks.layer_speed", "--rounds", "3"]]
    if torch.cuda.is_available():
        layer.append(PY + ["benchmarks.layer_speed", "--device", "cuda"])
    return {
        # the dense perplexity of the whole test split quoted in docs/results.md
        "dense_ppl": [[str(Path(sys.executable).with_name("armor-eval")), "ppl", "default"]],
        "results": [PY + ["benchmarks.results", "--windows", "8", "--iters", "20", "--nsamples", "64", "--seqlen", "512"]],
        "calibration_order": [PY + ["benchmarks.calibration_order", "--windows", "8", "--iters", "100", "--nsamples",
                                    "64", "--seqlen", "512"]],
        # every refinement row (SparseGPT and ARMOR with and without, the ablations, steps), then the time it adds
        "refinement": [PY + ["benchmarks.refinement", "--workers", "2", "--steps", "8", "16", "64"]],
        "refinement_time": [PY + ["benchmarks.refinement", "--timing", "4", "--workers", "2"]],
        # reads the statistics the results step left in out/bench-results/stats
        "solver_speed": [PY + ["benchmarks.solver_speed", "--threads", "1", "--default-model-layer", "0", "--large",
                               "--sweep", "--doc", "docs/results.md", "--out", "out/solver_speed.json"]],
        "layer_speed": layer,
        "serve_speed": [["armor-convert", dense, *PERF_ARMOR], ["armor-convert", dense, *PERF_CORE],
                        PY + ["benchmarks.serve_speed", "--dense", dense, "--armor", "out/perf/armor",
                              "--core", "out/perf/core", "--batch", "1,16", "--tokens", "64", "--threads", "1", "--rounds", "1"]],
        # writes its synthetic 7B-shaped model and converts it itself (out/e2e, reused when unchanged)
        "e2e_decode": [PY + ["benchmarks.e2e_decode"]],
        # the same synthetic model and ARMOR checkpoints, beside vLLM's int8 and int4 formats
        "peers": [PY + ["benchmarks.peers"]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="run only these steps")
    p.add_argument("--list", action="store_true", help="print the commands and stop")
    a = p.parse_args()
    plan = steps(str(default_model_dir()))
    unknown = set(a.only or ()) - set(plan)
    if unknown:
        p.error(f"unknown steps {sorted(unknown)}; steps: {', '.join(plan)}")
    for name, cmds in plan.items():
        if a.only and name not in a.only:
            continue
        t0 = time.perf_counter()
        for cmd in cmds:
            shown = " ".join(cmd).replace(sys.executable + " -m", "python -m").replace(str(Path(sys.executable).parent) + "/", "")
            print(f"\n== {name}: {shown}", flush=True)
            if a.list:
                continue
            if cmd[0] == "armor-convert":
                convert_once(cmd[1:])
            else:
                subprocess.run(cmd, check=True)
        if not a.list:
            print(f"== {name}: done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
