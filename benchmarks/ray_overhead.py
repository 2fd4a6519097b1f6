"""What Ray costs a conversion: `python -m benchmarks.ray_overhead [--doc docs/scale.md]`.

The same conversion of the default model three times, one after the other, with the same number
of solves at once: a local process pool (``--workers N``), ``--executor ray`` (a Ray instance the
converter starts and stops), and ``--ray-address`` of a Ray cluster already running (one node with
every core of this machine, as ``ray start --head`` gives). Then the Ray task timeline of the last
run: each task's phases, how long the first task waited for a worker, and how long workers sat
idle between tasks. The three checkpoints must be bit-identical; the benchmark fails otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from converters.commands.default_model import default_model_dir

from .common import footer, write_section


def convert(out: Path, args: list[str]) -> tuple[float, float]:
    """Wall seconds of one armor-convert run in a fresh interpreter (as a user runs it), and the
    1-min load average when it started (other jobs on the machine slow one run and not another)."""
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", "from converters.commands.cli import convert_main; convert_main()",
                        str(default_model_dir()), str(out), *args],
                       env=dict(os.environ, TQDM_DISABLE="1"), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"armor-convert {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return time.perf_counter() - t0, load


def solve_seconds(out: Path) -> float:
    """Seconds spent inside the solves, summed over jobs (as each solve timed itself)."""
    return sum(r["seconds"] for r in json.loads((out / "armor_report.json").read_text())["layers"])


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = ({k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()} for d in (a, b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def timeline_summary(events: list[dict]) -> dict:
    """Per-phase durations of the solve tasks, the first task's wait, and workers' idle gaps (seconds)."""
    spans: dict[str, list[dict]] = {}
    for e in events:
        if e.get("ph") == "X":
            spans.setdefault(e["cat"], []).append(e)
    tasks = spans.get("task::solve", [])
    phases = {name: [e["dur"] / 1e6 for e in spans.get(cat, [])] for name, cat in
              (("whole task", "task::solve"), ("deserialize arguments", "task:deserialize_arguments"),
               ("execute (the solve)", "task:execute"), ("store outputs", "task:store_outputs"))}
    by_worker: dict[str, list[dict]] = {}
    for e in tasks:
        by_worker.setdefault(e["tid"], []).append(e)
    gaps = [(b["ts"] - (a["ts"] + a["dur"])) / 1e6 for ws in by_worker.values()
            for a, b in zip(sorted(ws, key=lambda e: e["ts"]), sorted(ws, key=lambda e: e["ts"])[1:])]
    first_submit = min((e["ts"] for e in spans.get("submit_task", [])), default=None)
    first_start = min((e["ts"] for e in tasks), default=None)
    return {"phases": phases, "workers": len(by_worker), "gaps": gaps,
            "first_wait": (first_start - first_submit) / 1e6 if first_submit and first_start else None}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("ray_overhead", description=__doc__)
    p.add_argument("--workers", type=int, default=2, help="solves at once, for every executor")
    p.add_argument("--args", default="--preset quick --iters 5", help="further armor-convert options")
    p.add_argument("--work", default="out/bench-ray", help="where the checkpoints and the timeline go")
    p.add_argument("--doc", help="write the results into this markdown file's ray-overhead section")
    a = p.parse_args(argv)
    import ray
    from ray.cluster_utils import Cluster

    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    load, uptime = os.getloadavg()[0], subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    common = [*shlex.split(a.args), "--workers", str(a.workers)]
    default_model_dir()  # materialised before any timing
    runs = {"local (process pool)": (work / "local", common),
            "--executor ray (starts its own Ray)": (work / "ray", [*common, "--executor", "ray"])}
    seconds = {name: convert(out, args) for name, (out, args) in runs.items()}
    t0 = time.perf_counter()
    # workers at nice 0 like the converter's own instance (`RAY_worker_niceness=0 ray start --head`)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": os.cpu_count(), "include_dashboard": False,
                                                            "_system_config": {"worker_niceness": 0}})
    cluster_start = time.perf_counter() - t0
    try:
        name = "--ray-address (Ray already running)"
        runs[name] = (work / "ray-address", [*common, "--ray-address", cluster.address])
        seconds[name] = convert(*runs[name])
        ray.init(address=cluster.address, logging_level="ERROR")
        events = ray.timeline()
        (work / "timeline.json").write_text(json.dumps(events))  # chrome://tracing or ui.perfetto.dev
        ray.shutdown()
    finally:
        cluster.shutdown()
    outs = [out for out, _ in runs.values()]
    if not all(same_tensors(outs[0], o) for o in outs[1:]):
        raise SystemExit("the checkpoints differ between executors")
    tl = timeline_summary(events)

    lines = ["| executor | wall s | solve s (sum over jobs) | load average at its start |", "|---|---|---|---|"]
    lines += [f"| {name} | {seconds[name][0]:.1f} | {solve_seconds(out):.1f} | {seconds[name][1]:.1f} |"
              for name, (out, _) in runs.items()]
    lines += ["", f"All three checkpoints bit-identical. Starting the running cluster beforehand took {cluster_start:.1f} s "
                  "(not in its row).", "",
              f"Ray task timeline of the `--ray-address` run ({len(tl['phases']['whole task'])} tasks on "
              f"{tl['workers']} worker processes):", "",
              "| phase | median ms | max ms | total s |", "|---|---|---|---|"]
    for phase, d in tl["phases"].items():
        if d:
            lines.append(f"| {phase} | {statistics.median(d) * 1e3:.1f} | {max(d) * 1e3:.1f} | {sum(d):.1f} |")
    if tl["first_wait"] is not None:
        lines += ["", f"First task started {tl['first_wait']:.1f} s after the first submission (a worker process "
                      "starts and unpickles its first task, importing torch and the converter)."]
    if tl["gaps"]:
        lines += [f"Workers sat idle between consecutive tasks for {sum(tl['gaps']):.1f} s in all (median gap "
                  f"{statistics.median(tl['gaps']) * 1e3:.0f} ms; this includes waiting for the driver to calibrate "
                  "the next layer)."]
    cmd = f"python -m benchmarks.ray_overhead --workers {a.workers} --args '{a.args}'" + (f" --doc {a.doc}" if a.doc else "")
    text = "\n".join([*lines, "", f"`uptime` at the start: `{uptime}`", *footer(load, cmd)])
    print(text)
    if a.doc:
        write_section(a.doc, "ray-overhead", text)


if __name__ == "__main__":
    main()
