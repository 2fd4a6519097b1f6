"""Decode speed of a 7B-shaped model in vLLM, dense vs ARMOR on `sparse_cpu`: `python -m benchmarks.e2e_decode`.

Why a synthetic model: the layer benchmark times one GEMM; serving a whole model adds attention,
norms, the lm_head, sampling and the scheduler, and at 7B shapes the decoder linears dominate the
bytes read per token, unlike the 135M default model whose embeddings weigh as much as its layers.
No 7B checkpoint is available offline, and speed does not depend on the weights' values, so this
writes a Llama with Llama-2-7B's layer shapes (hidden 4096, intermediate 11008, 32 heads, 32 KV
heads, head_dim 128) but only ``--layers`` decoder layers, the default model's tokenizer and vocab
(49152, untied lm_head), random bf16 weights (std 0.02, norms 1) in one safetensors shard per
layer. The real converter then makes an ARMOR checkpoint of it (b = 128, no solver iterations:
the layout, not the accuracy, decides the speed), and each engine runs in its own subprocess
through :mod:`benchmarks.serve_speed` (bf16, eager), rounds interleaving the engines.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from armor_vllm.format import apply_umask
from converters.commands.default_model import default_model_dir
from converters.commands.reuse import convert_once

from .common import IdleGuard, check_engine_options, engine_options, footer, publish
from .layer_speed import read_bandwidth
from .serve_speed import RATES, best_of_rounds

SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, head_dim=128)
LINEARS = {"self_attn.q_proj": (4096, 4096), "self_attn.k_proj": (4096, 4096), "self_attn.v_proj": (4096, 4096),
           "self_attn.o_proj": (4096, 4096), "mlp.gate_proj": (11008, 4096), "mlp.up_proj": (11008, 4096),
           "mlp.down_proj": (4096, 11008)}


def write_synthetic(out: Path, layers: int) -> Path:
    """The synthetic bf16 Llama in ``out`` (reused when its config matches)."""
    src = default_model_dir()
    config = json.loads((src / "config.json").read_text())
    config.update(SHAPE, num_hidden_layers=layers, tie_word_embeddings=False, dtype="bfloat16",
                  max_position_embeddings=4096, _model_name_or_path="synthetic 7B-shaped Llama (random weights)")
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text()) == config:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    vocab, hidden = config["vocab_size"], SHAPE["hidden_size"]

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": rand(vocab, hidden)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shard = {p + name + ".weight": rand(*shape) for name, shape in LINEARS.items()}
        shard.update({p + norm: torch.ones(hidden, dtype=torch.bfloat16)
                      for norm in ("input_layernorm.weight", "post_attention_layernorm.weight")})
        shards.append(shard)
    shards.append({"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16), "lm_head.weight": rand(vocab, hidden)})
    index = {"metadata": {"total_size": sum(t.numel() * 2 for s in shards for t in s.values())}, "weight_map": {}}
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(shard, name))
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    apply_umask(out)  # safetensors writes 0600
    for f in src.iterdir():  # tokenizer, chat template, generation config
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config, indent=2))  # last: marks the directory complete
    return out


def armor_checkpoint(dense: Path, scheme: str = "none") -> Path:
    """The ARMOR checkpoint of the synthetic model beside it (converted once; ``scheme`` W8A16: int8 kept values).

    No solver iterations and 4 × 64 calibration tokens: the layout, not the accuracy, decides the speed."""
    out = dense.with_name(dense.name + ("-armor" if scheme == "none" else f"-armor-{scheme.lower()}"))
    convert_once([str(dense), str(out), "--method", "armor", "--iters", "0", "--nsamples", "4", "--seqlen", "64",
                  "--block-size", "128", "--dtype", "bfloat16", "--refine", "none", *(["--scheme", scheme] if scheme != "none" else [])])
    return out


def byte_split(row: dict) -> dict:
    """Loaded bytes: whole model, the decoder layers' linears, and what one decode step reads (all but the embedding)."""
    mods = row["module_bytes"]
    linears = sum(v for k, v in mods.items() if re.search(r"layers\.\d+\..*proj$", k))
    embed = sum(v for k, v in mods.items() if k.endswith("embed_tokens"))
    return {"total": row["bytes"], "linears": linears, "per_step": row["bytes"] - embed}


def markdown(results: dict[int, list[dict]], args, cmd: str, bandwidth: dict[int, float]) -> str:
    bs = [str(b) for b in args.batch]
    lines = [f"## End-to-end decode at 7B layer shapes in vLLM (CPU, bf16, {args.layers} layers)", "",
             f"A synthetic Llama with Llama-2-7B's layer shapes (hidden 4096, intermediate 11008, 32 heads, 32 KV "
             f"heads), {args.layers} decoder layers, the default model's tokenizer and vocab (49152, untied "
             "lm_head), random weights; ARMOR checkpoint from `armor-convert --method armor --iters 0 "
             "--block-size 128 --dtype bfloat16` (per-shard B_in). vLLM eager, in-process engine core, "
             f"`max_model_len` 512; greedy, {args.tokens} output tokens per prompt with `ignore_eos`, short prompts. "
             f"{RATES} Best of {args.repeats} calls after one warm-up and of {args.rounds} rounds that start both "
             "engines in turn. Dense is vLLM's own path (prepacked oneDNN GEMM); ARMOR runs "
             "`ARMOR_VLLM_BACKEND=sparse_cpu`.", "",
             "| threads | engine | " + " | ".join(f"tok/s batch {b}" for b in bs) + " | "
             + " | ".join(f"decode tok/s batch {b}" for b in bs)
             + " | loaded weights MB | decoder linears MB | GB/s at batch 1 (read BW) | start-up s |",
             "|" + "---|" * (2 * len(bs) + 6)]
    for th, (dense, armor) in results.items():
        db = byte_split(dense)
        for r in (dense, armor):
            rb = byte_split(r)

            def rel(v, ref, fmt):
                return format(v, fmt) if r is dense else f"{v:{fmt}} ({v / ref:.2f}×)"
            speed = [rel(r["speed"][b][key], dense["speed"][b][key], ".2f") for key in ("tok_s", "decode_tok_s")
                     for b in bs]
            gbs = rb["per_step"] * r["speed"][bs[0]]["decode_tok_s"] / 1e9
            lines.append(f"| {th} | {r['label']} | " + " | ".join(speed)
                         + f" | {rel(rb['total'] / 1e6, db['total'] / 1e6, '.0f')} "
                         f"| {rel(rb['linears'] / 1e6, db['linears'] / 1e6, '.0f')} | {gbs:.1f} ({bandwidth[th]:.1f}) "
                         f"| {r['startup_s']:.0f} |")
    lines += ["", "(×) = ARMOR / dense with the same threads, from the same run. Loaded weights: as in the serving "
                  "table (parameters, buffers and oneDNN-prepacked weights after loading; KV cache excluded). "
                  "Decoder linears: q/k/v/o, gate/up/down of every decoder layer (vLLM's fused qkv_proj and "
                  "gate_up_proj). GB/s = weight bytes one decode step reads (everything but the input embedding) × "
                  f"decode tok/s at batch {bs[0]}: the bandwidth the engine achieves if weights dominate a step; read BW = "
                  "summing a 1 GiB tensor with that many threads. Threads are not pinned "
                  "(`VLLM_CPU_OMP_THREADS_BIND=nobind`)."]
    return "\n".join(lines + footer(args.load, cmd))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the synthetic model")
    p.add_argument("--cache", default="out/e2e", help="where the synthetic model and its ARMOR checkpoint live")
    p.add_argument("--threads", default="2,1", help="comma-separated OpenMP thread counts per engine")
    engine_options(p, batch="1,8", tokens=32, rounds=2, rounds_help="start both engines this many times, in turn (best counts)")
    args = p.parse_args()
    check_engine_options(p, args)
    threads = [int(t) for t in args.threads.split(",")]
    args.load = IdleGuard(args.allow_loaded, own_threads=max(threads)).start()
    args.compiled = False
    cache = Path(args.cache)
    dense = write_synthetic(cache / f"synth-7b-shape-{args.layers}l", args.layers)
    engines = [("dense", str(dense), None), ("ARMOR", str(armor_checkpoint(dense)), "sparse_cpu")]
    results, bandwidth = {}, {}
    for th in threads:
        bandwidth[th] = read_bandwidth(th)
        results[th] = best_of_rounds(engines, argparse.Namespace(**{**vars(args), "threads": th}))
    cmd = shlex.join(["python", "-m", "benchmarks.e2e_decode", *sys.argv[1:]])
    publish(args, "e2e_decode_cpu", lambda: markdown(results, args, cmd, bandwidth))


if __name__ == "__main__":
    main()
