"""ARMOR against the quantized formats vLLM already serves on a CPU, at 7B layer shapes: `python -m benchmarks.peers`.

Why: a user who wants a smaller, faster model in vLLM on a CPU can already serve int8 W8A8 and int4
W4A16 checkpoints; ARMOR is worth its format only where it beats them on speed or bytes. Five
checkpoints of :mod:`benchmarks.e2e_decode`'s synthetic model (Llama-2-7B's layer shapes, random bf16
weights, ``--layers`` decoder layers: speed does not depend on the values), each built once under ``--cache``:

- dense bf16: vLLM's own path (prepacked oneDNN GEMM; on a CPU without AVX-512 BF16 oneDNN has no bf16
  matmul and vLLM falls back to ``torch.nn.functional.linear``: the table names what it used);
- W8A8 int8: compressed-tensors ``int-quantized``, the INT8_W8A8 preset (int8 per-channel weights,
  activations quantized per token at run time), written by :mod:`benchmarks.peer_checkpoints`;
- W4A16 int4: GPTQ layout, 4 bits, group 128, symmetric (same module);
- ARMOR bf16 and ARMOR W8A16: ``armor-convert --iters 0 --block-size 128 [--scheme W8A16]``, on ``sparse_cpu``.

Each engine runs in its own process through :mod:`benchmarks.serve_speed`'s worker, with the same settings
for all (bf16, eager unless ``--compiled``, in-process engine core, unpinned threads): decode tok/s at each
``--batch``, prefill tok/s of one fresh ``--prefill``-token prompt, loaded weight bytes. Rounds start every
engine in turn, the order reversed every other round so that a drift in the machine's speed favours no end
of the list; a ratio is the median over rounds of (this engine / dense in the same round), so each ratio
pairs numbers measured minutes apart. A format vLLM cannot run here gets a row that says why: W4A16 where
vLLM's int4 CPU GEMM is missing (its wheel builds it with AVX-512 only), any engine that fails with its error.

    python -m benchmarks.peers                       # 8 layers, 1 and 2 threads, 3 rounds -> docs/performance.md
    python -m benchmarks.peers --layers 1 --batch 1,8 --tokens 4 --prefill 64 --repeats 1 --rounds 1 \\
        --threads 2 --doc ''                         # smoke run: minutes
"""
from __future__ import annotations

import argparse
import multiprocessing
import shlex
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .common import IdleGuard, check_engine_options, engine_options, footer, publish
from .e2e_decode import armor_checkpoint, byte_split, write_synthetic
from .peer_checkpoints import int4_kernel_missing, linear_bytes_on_disk, write_w4a16, write_w8a8
from .serve_speed import RATES, EngineError, run_engine

SYNTHETIC = ("A synthetic Llama with Llama-2-7B's layer shapes (hidden 4096, intermediate 11008, 32 heads, 32 KV "
             "heads), {layers} decoder layer(s), the default model's tokenizer and vocab (49152, untied lm_head), "
             "random bf16 weights (`benchmarks/e2e_decode.py`).")


@dataclass
class Engine:
    label: str
    layout: str
    model: Path
    backend: str | None = None  # ARMOR_VLLM_BACKEND
    why_not: str | None = None  # set when it cannot run here


def build(cache: Path, layers: int) -> list[Engine]:
    """The five checkpoints (each reused when already built with the same settings) and how to serve them."""
    dense = write_synthetic(cache / f"synth-7b-shape-{layers}l", layers)
    # vLLM's GPTQ helpers and its kernel check import vllm, which sets environment variables the engines
    # started from this process must not inherit: they run in a child
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        w8a8, w4a16 = pool.submit(write_w8a8, dense).result(), pool.submit(write_w4a16, dense).result()
        int4_missing = pool.submit(int4_kernel_missing).result()
    return [
        Engine("dense bf16", "bf16", dense),
        Engine("W8A8 int8", "compressed-tensors int-quantized: int8 weights, a scale per output channel; "
               "int8 activations, a scale per token", w8a8),
        Engine("W4A16 int4", "GPTQ: 4-bit weights, a scale per 128 inputs per output channel", w4a16,
               why_not=None if int4_missing is None else
               f"{int4_missing} (its checkpoint's decoder linears: {linear_bytes_on_disk(w4a16) / 1e6:.0f} MB)"),
        Engine("ARMOR bf16", "2:4 bf16 kept values + bitmask, B_in/B_out b = 128", armor_checkpoint(dense),
               "sparse_cpu"),
        Engine("ARMOR W8A16", "2:4 int8 kept values (a scale per output channel) + bitmask, B_in/B_out bf16",
               armor_checkpoint(dense, "W8A16"), "sparse_cpu"),
    ]


def measure(engines: list[Engine], args) -> tuple[dict[str, list[dict]], dict[str, str]]:
    """({label: one result per round}, {label: why it has no numbers}); rounds alternate the engines' order."""
    runs: dict[str, list[dict]] = {e.label: [] for e in engines}
    failed = {e.label: e.why_not for e in engines if e.why_not}
    for r in range(args.rounds):
        for e in engines if r % 2 == 0 else engines[::-1]:
            if e.label in failed:
                continue
            try:
                runs[e.label].append(run_engine(e.label, str(e.model), e.backend, args))
            except EngineError as err:
                if e is engines[0]:
                    raise  # without dense there is nothing to pair with
                failed[e.label] = f"vLLM failed: {err}"
    return runs, failed


def metrics(res: dict, batches: list[int]) -> dict[str, float]:
    """The numbers one round gives per engine: decode tok/s per batch size, prefill tok/s."""
    decode = {f"decode {b}": res["speed"][str(b)]["decode_tok_s"] for b in batches}
    return {**decode, "prefill": res["prefill"]["tok_s"]}


def rows(engines: list[Engine], runs: dict[str, list[dict]], failed: dict[str, str], th: int, args) -> list[str]:
    """Table rows of one thread count: medians over rounds, (×) = median of the rounds' ratios to dense."""
    dense = [metrics(r, args.batch) for r in runs[engines[0].label]]
    dense_bytes = byte_split(runs[engines[0].label][-1])
    out = []
    for e in engines:
        if e.label in failed:
            why = failed[e.label].replace("|", "\\|")  # an error message must not split the row
            out.append(f"| {th} | {e.label} | {e.layout} | not run: {why} |" + " – |" * (len(args.batch) + 2))
            continue
        mine = [metrics(r, args.batch) for r in runs[e.label]]
        cells = []
        for key in dense[0]:
            value = statistics.median(m[key] for m in mine)
            ratio = statistics.median(m[key] / d[key] for m, d in zip(mine, dense))
            cells.append(f"{value:.2f}" if e is engines[0] else f"{value:.2f} ({ratio:.2f}×)")
        b = byte_split(runs[e.label][-1])
        for key in ("linears", "total"):
            mb = f"{b[key] / 1e6:.0f}"
            cells.append(mb if e is engines[0] else f"{mb} ({b[key] / dense_bytes[key]:.2f}×)")
        out.append(f"| {th} | {e.label} | {e.layout} | " + " | ".join(cells) + " |")
    return out


def markdown(table: list[str], args, cmd: str) -> str:
    bs = args.batch
    head = ("| threads | engine | checkpoint | " + " | ".join(f"decode tok/s batch {b}" for b in bs)
            + f" | prefill tok/s ({args.prefill}-token prompt) | loaded decoder linears MB | loaded weights MB |")
    mode = "compiled (`enforce_eager=False`)" if args.compiled else "eager (`enforce_eager=True`)"
    lines = [f"## Peers: ARMOR and the formats vLLM serves quantized on CPU (7B layer shapes, {args.layers} layers)",
             "",
             f"{SYNTHETIC.format(layers=args.layers)} Checkpoints: dense bf16; W8A8 and W4A16 (GPTQ) by "
             "round-to-nearest (`benchmarks/peer_checkpoints.py`: speed and bytes, not quality); ARMOR from "
             "`armor-convert --method armor --iters 0 --block-size 128 --dtype bfloat16` with and without "
             "`--scheme W8A16`. Each engine in its own process, the same settings for all: vLLM bf16, "
             f"{mode}, in-process engine core, `max_model_len` {max(512, args.prefill + 1)}, `max_num_seqs` "
             f"{max(bs)}, OpenMP threads unpinned (`VLLM_CPU_OMP_THREADS_BIND=nobind`). vLLM picks each format's "
             f"kernel (dense: {'; '.join(args.dense_gemm) or 'not recorded'}; W8A8: oneDNN's int8 GEMM with dynamic per-token activation quantization, or its AMX kernel "
             "where present; W4A16: `cpu_gemm_wna16`); ARMOR runs `ARMOR_VLLM_BACKEND=sparse_cpu`. Greedy, "
             f"{args.tokens} output tokens per prompt with `ignore_eos`, short prompts. {RATES} Prefill tok/s = "
             f"{args.prefill} / the wall time of `generate()` of one prompt of random token ids with "
             "`max_tokens=1`, a fresh prompt per call so that vLLM's prefix cache cannot skip it. Each number is "
             f"the best of {args.repeats} call(s) after a warm-up, then the median over {args.rounds} round(s) "
             "that start every engine in turn (the order reversed every other round).", "",
             head, "|" + "---|" * (len(bs) + 6), *table, "",
             "(×) = median over rounds of this engine / dense in the same round, same threads. Loaded weights: "
             "parameters and buffers of the vLLM model after loading, plus what vLLM's CPU GEMMs prepacked out of "
             "them (dense: oneDNN's bf16 weight at its logical size; W8A8: oneDNN's int8 weight, 1 byte per "
             "element); KV cache excluded. Decoder linears: q/k/v/o, gate/up/down of every decoder layer. "
             "Embeddings, norms and the lm_head stay bf16 in every checkpoint."]
    return "\n".join(lines + footer(args.load, cmd))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the synthetic model")
    p.add_argument("--cache", default="out/e2e", help="where the checkpoints live (shared with e2e_decode)")
    engine_options(p, batch="1,8,32", tokens=32, rounds=3,
                   rounds_help="start every engine this many times, in turn (median)")
    p.add_argument("--prefill", type=int, default=512, help="prompt tokens of the prefill measurement")
    p.add_argument("--threads", default="1,2", help="comma-separated OpenMP thread counts per engine")
    p.add_argument("--compiled", action="store_true", help="torch.compile mode instead of eager")
    args = p.parse_args()
    check_engine_options(p, args)
    if args.prefill < 1:
        p.error(f"--prefill {args.prefill}: at least 1 token")
    threads = [int(t) for t in args.threads.split(",")]
    args.load = IdleGuard(args.allow_loaded, own_threads=max(threads)).start()
    engines = build(Path(args.cache), args.layers)
    table = []
    for th in threads:
        targs = argparse.Namespace(**{**vars(args), "threads": th})
        runs, failed = measure(engines, targs)
        args.dense_gemm = runs[engines[0].label][-1].get("gemm", [])
        table += rows(engines, runs, failed, th, targs)
    publish(args, "peers_cpu", lambda: markdown(table, args, shlex.join(["python", "-m", "benchmarks.peers", *sys.argv[1:]])))


if __name__ == "__main__":
    main()
