"""Generation speed and memory of the default model in vLLM: dense, ARMOR and core-only 2:4 (fold, sparse_cpu).

    VLLM_CPU_KVCACHE_SPACE=1 python -m benchmarks.serve_speed --dense DIR --armor DIR --core DIR

Why each engine gets its own subprocess: vLLM reads ``ARMOR_VLLM_BACKEND`` and its own settings
once per process, and a finished engine does not give its memory back. Each worker loads one
checkpoint (``LLM(..., dtype="bfloat16", max_model_len=512)``, in-process engine core, "uni"
executor: seconds to start instead of minutes), runs one warm-up generation, then times greedy
generation of a fixed number of tokens per prompt (``ignore_eos``) at each batch size. The best of
``--repeats`` calls and of ``--rounds`` rounds (every engine started once per round, in turn)
counts, which keeps other jobs on a shared machine from deciding the ratios.

Eager mode by default: compiling costs 60–120 s per engine on a small CPU, and the fold runs
vLLM's dense GEMM either way; ``--compiled`` measures the compiled mode. OpenMP threads are not
pinned (``VLLM_CPU_OMP_THREADS_BIND=nobind`` unless set): vLLM's default pinning makes decoding
crawl when other processes share the cores. Also reported: checkpoint bytes (Σ *.safetensors) and
the bytes of the loaded weights, read inside the engine through ``llm.apply_model``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import shlex
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from armor_vllm.format import weight_bytes

from .common import IdleGuard, check_engine_options, engine_options, footer, publish

PROMPTS = ["The capital of France is", "Photosynthesis is the process by which",
           "Once upon a time, in a small village,", "The three laws of motion state that",
           "To bake bread you need", "The history of the Roman Empire", "A prime number is", "Water boils at",
           "The largest planet in the solar system", "In computer science, a hash table", "The theory of evolution",
           "Mount Everest is located", "The human heart has four chambers:", "Shakespeare wrote",
           "An electric motor works by", "The French Revolution began in"]


RATES = ("tok/s = generated tokens / wall time of `generate()`, prefill included; decode tok/s = the tokens after "
         "each prompt's first / (that wall time − the wall time of `generate()` with `max_tokens=1`): the rate once "
         "the prompts are in, as time per output token measures it.")


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def inspect_model(model) -> dict:
    """Runs inside the engine (so must be importable): bytes of the loaded weights, in all and per module
    (so callers can split off the decoder linears or the embedding).

    Parameters and buffers, plus what vLLM's CPU GEMM dispatch moved out of them: its prepacked
    weight (a tensor held by ``layer.cpu_linear``) or, behind an opaque oneDNN handle, the
    logical N×K size of the weight it replaced with an empty parameter; likewise the int8 weight
    (1 byte per element) that the W8A8 kernel's oneDNN handle took over from a parameter set to None.
    """
    seen, per_module, gemms = set(), {}, set()
    for name, module in model.named_modules():
        own = 0
        for t in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
            if t.data_ptr() not in seen:  # tied embeddings count once
                seen.add(t.data_ptr())
                own += t.numel() * t.element_size()
        fn = getattr(module, "cpu_linear", None)
        cells = [c.cell_contents for c in getattr(fn, "__closure__", None) or ()]
        tensors = [c for c in cells if isinstance(c, torch.Tensor)]
        if fn is not None:  # which of dispatch_cpu_unquantized_gemm's branches this layer got
            gemms.add("sgl-kernel (prepacked)" if tensors else "oneDNN (prepacked)" if cells else
                      "torch.nn.functional.linear, vLLM's fallback where oneDNN has no bf16 matmul for the CPU")
        if tensors:
            own += sum(t.numel() * t.element_size() for t in tensors)
        elif fn is not None and module.weight.numel() == 0:
            own += module.output_size_per_partition * module.input_size_per_partition * module.weight.element_size()
        kernel = getattr(getattr(module, "scheme", None), "kernel", None)
        handler = getattr(kernel, "dnnl_handler", None)
        if handler is not None and getattr(module, "weight", None) is None:
            own += handler.k * handler.n
        if own:
            per_module[name] = own
    return {"bytes": sum(per_module.values()), "module_bytes": per_module, "gemm": sorted(gemms),
            "b_in_params": sum(name.endswith(".b_in") for name, _ in model.named_parameters())}


def long_prompt(n: int, seed: int) -> dict:
    """``n`` random token ids (a fresh prompt per seed: vLLM's prefix cache would skip a repeated one)."""
    ids = torch.randint(1000, 40000, (n,), generator=torch.Generator().manual_seed(seed))
    return {"prompt_token_ids": ids.tolist()}


def worker(args) -> None:
    """One engine: start it, warm up, time each batch size (and with ``--prefill N`` an N-token prompt), write
    JSON to ``args.out``; an exception goes there too, as {"error": ...}, so the caller can say why it failed."""
    try:
        result = measure(args)
    except Exception as e:
        Path(args.out).write_text(json.dumps({"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}))
        raise
    Path(args.out).write_text(json.dumps(result))


def measure(args) -> dict:
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=max(512, args.prefill + 1),
              max_num_seqs=max(args.batch), enforce_eager=not args.compiled, distributed_executor_backend="uni",
              seed=0)
    startup = time.perf_counter() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    llm.generate(prompts(max(args.batch)), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                 use_tqdm=False)  # warm-up
    first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    speed = {}
    for bs in args.batch:
        best = {"all": float("inf"), "first": float("inf")}
        for _ in range(args.repeats):
            for key, params in (("all", sp), ("first", first)):
                t = time.perf_counter()
                outs = llm.generate(prompts(bs), params, use_tqdm=False)
                best[key] = min(best[key], time.perf_counter() - t)
                if key == "all":
                    n = sum(len(o.outputs[0].token_ids) for o in outs)
                    assert n == bs * args.tokens, f"generated {n} tokens, expected {bs}×{args.tokens}"
                    text = outs[0].outputs[0].text
        speed[str(bs)] = {"seconds": best["all"], "tok_s": n / best["all"], "first_s": best["first"],
                          "decode_tok_s": bs * (args.tokens - 1) / (best["all"] - best["first"])}
    prefill = {}
    if args.prefill:  # one prompt, one output token: the prompt's forward pass dominates
        seconds = []
        for seed in range(args.repeats + 1):  # the first call warms up this prompt length
            t = time.perf_counter()
            llm.generate(long_prompt(args.prefill, seed), first, use_tqdm=False)
            seconds.append(time.perf_counter() - t)
        best_s = min(seconds[1:])
        prefill = {"prefill": {"tokens": args.prefill, "seconds": best_s, "tok_s": args.prefill / best_s}}
    info = llm.apply_model(inspect_model)[0]
    return {"startup_s": startup, "speed": speed, "threads": torch.get_num_threads(), "first_text": text[:60],
            **prefill, **info}


def quant_info(path: str) -> str:
    q = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    return f"{q.get('method', '?')}, b = {q.get('block_size')}" if q else "dense"


class EngineError(RuntimeError):
    """An engine that did not start or did not finish its measurements; the message says why."""


def run_engine(label: str, model: str, backend: str | None, args) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # pinned threads crawl when other jobs share the cores
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    env.pop("ARMOR_VLLM_BACKEND", None)
    if backend:
        env["ARMOR_VLLM_BACKEND"] = backend
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.serve_speed", "--worker", "--model", model, "--out", str(out),
               "--batch", ",".join(map(str, args.batch)), "--tokens", str(args.tokens), "--repeats", str(args.repeats),
               "--prefill", str(getattr(args, "prefill", 0))]
        print(f"== {label}: {model} (ARMOR_VLLM_BACKEND={backend})", flush=True)
        proc = subprocess.run(cmd + (["--compiled"] if args.compiled else []), env=env, check=False)
        res = json.loads(out.read_text()) if out.is_file() else {}
        if proc.returncode or "error" in res:
            why = res.get("error") or f"worker exited with status {proc.returncode}"
            raise EngineError(f"{label} ({model}): {why}")
    has_b = not quant_info(model).endswith(("dense", "b = None"))
    if (res["b_in_params"] > 0) != (backend in ("sandwich", "sparse_cpu") and has_b):  # did the backend we asked for run?
        raise RuntimeError(f"{label}: {res['b_in_params']} b_in parameters with ARMOR_VLLM_BACKEND={backend}")
    res.update(bind=env["VLLM_CPU_OMP_THREADS_BIND"], label=label, model=model, backend=backend or "–",
               ckpt=weight_bytes(model), quant=quant_info(model))
    print(f"{label} ({backend}): " + ", ".join(f"batch {b} {v['tok_s']:.1f} tok/s (decode {v['decode_tok_s']:.1f})"
                                               for b, v in res["speed"].items())
          + f"; first output {res['first_text']!r}", flush=True)
    return res


def best_of_rounds(engines: list[tuple], args) -> list[dict]:
    """One row per engine, best speed and start-up over ``args.rounds`` rounds that run every engine in turn.

    Interleaved so that a burst of outside load hits all engines alike instead of deciding a ratio.
    """
    rows = [run_engine(*e, args) for e in engines]
    for _ in range(args.rounds - 1):
        for row, e in zip(rows, engines):
            again = run_engine(*e, args)
            row["startup_s"] = min(row["startup_s"], again["startup_s"])
            for b, v in again["speed"].items():
                best = row["speed"][b]
                for key, pick in (("seconds", min), ("tok_s", max), ("first_s", min), ("decode_tok_s", max)):
                    best[key] = pick(best[key], v[key])
    return rows


def markdown(rows: list[dict], args, cmd: str) -> str:
    d = rows[0]
    bs = [str(b) for b in args.batch]
    mode = f"{'compiled' if args.compiled else 'eager'} mode (`enforce_eager={not args.compiled}`)"
    lines = ["## Serving speed in vLLM (CPU)", "",
             f"Default model (SmolLM2-135M-Instruct) in vLLM, bf16, {mode}, in-process engine core, `max_model_len` "
             f"512, {d['threads']} OpenMP thread(s), `VLLM_CPU_OMP_THREADS_BIND={d['bind']}`. Greedy, {args.tokens} "
             f"output tokens per prompt with `ignore_eos`, short prompts. {RATES} Best of {args.repeats} calls after "
             f"one warm-up and of {args.rounds} round(s) that start every engine in turn.", "",
             "| engine | checkpoint | backend | " + " | ".join(f"tok/s batch {b}" for b in bs) + " | "
             + " | ".join(f"decode tok/s batch {b}" for b in bs) + " | start-up s | checkpoint MB | loaded weights MB |",
             "|" + "---|" * (2 * len(bs) + 6)]
    for r in rows:
        def rel(v, ref):
            return f"{v:.1f}" if r is d else f"{v:.1f} ({v / ref:.2f}×)"
        speed = [rel(r["speed"][b][key], d["speed"][b][key]) for key in ("tok_s", "decode_tok_s") for b in bs]
        lines.append(f"| {r['label']} | {r['quant']} | {r['backend']} | " + " | ".join(speed)
                     + f" | {r['startup_s']:.0f} | {rel(r['ckpt'] / 1e6, d['ckpt'] / 1e6)} | "
                     f"{rel(r['bytes'] / 1e6, d['bytes'] / 1e6)} |")
    lines += ["", "Checkpoints are stored in fp32 (the default model's own dtype) and include the dense embeddings; "
                  "the loaded model is bf16. Loaded weights = parameters and buffers of the vLLM model after "
                  "`process_weights_after_loading`, plus the weights vLLM's CPU GEMM prepacked out of them (at their "
                  "logical size where a oneDNN handle hides them); KV cache excluded. The fold holds one dense W_eff "
                  "per linear, exactly like dense; sparse_cpu keeps S compressed (kept values + bitmask) plus B_in "
                  "and B_out. Threads are not "
                  "pinned because vLLM's default (`auto`) pinning crawls when other processes share the cores."] + footer(args.load, cmd)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", help="the dense HF model dir (armor-prepare-default prints it)")
    p.add_argument("--armor", help="an ARMOR checkpoint (with B_in/B_out)")
    p.add_argument("--core", help="a 2:4 checkpoint without B_in/B_out (e.g. --method nowag-p)")
    p.add_argument("--threads", type=int, default=0, help="OpenMP threads per engine (default: all cores)")
    p.add_argument("--compiled", action="store_true", help="torch.compile mode instead of eager")
    engine_options(p, batch="1,16", tokens=64, rounds=2,
                   rounds_help="start every engine this many times, in turn (best counts)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prefill", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    check_engine_options(p, args)
    if args.worker:
        return worker(args)
    if not (args.dense and args.armor and args.core):
        p.error("--dense, --armor and --core are required")
    args.load = IdleGuard(args.allow_loaded, own_threads=args.threads or os.cpu_count() or 1).start()
    engines = [("dense", args.dense, None), ("ARMOR", args.armor, "fold"), ("ARMOR", args.armor, "sparse_cpu"),
               ("core-only 2:4", args.core, "fold"), ("core-only 2:4", args.core, "sparse_cpu")]
    rows = best_of_rounds(engines, args)
    cmd = "VLLM_CPU_KVCACHE_SPACE=1 " + shlex.join(["python", "-m", "benchmarks.serve_speed", *sys.argv[1:]])
    publish(args, "serve_speed_cpu", lambda: markdown(rows, args, cmd))


if __name__ == "__main__":
    main()
