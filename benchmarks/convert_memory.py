"""Peak host memory and disk of a conversion: `python -m benchmarks.convert_memory` -> docs/converter.md.

Converts the default model and a synthetic Llama of ~3B parameters in bf16 (random weights,
written here as several shards with an index; the default model's tokenizer) with a fast
method, and reports the converter's peak RSS against the model's bytes. ``--code DIR`` runs the
same command from another checkout of this repository (e.g. a `git worktree` of an older commit),
so before and after a change stand side by side (a checkout that knows `--refine`: the default preset
refines since then, and this measures the streaming pipeline without it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from armor_vllm.format import INDEX_FILE, weight_bytes
from converters.commands.default_model import default_model_dir

from .common import footer, write_section

SYNTHETIC = dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                 num_key_value_heads=8)


def synthetic_llama(out: Path, layers_per_shard: int = 4) -> Path:
    """A random bf16 Llama (~3.1B parameters) written shard by shard, never whole in memory."""
    if (out / INDEX_FILE).is_file():
        return out
    from transformers import LlamaConfig

    src = default_model_dir()
    cfg = LlamaConfig(vocab_size=json.loads((src / "config.json").read_text())["vocab_size"], tie_word_embeddings=False,
                      max_position_embeddings=2048, architectures=["LlamaForCausalLM"], dtype="bfloat16", **SYNTHETIC)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    h, m, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *shape: (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)  # noqa: E731
    groups = [list(range(i, min(i + layers_per_shard, cfg.num_hidden_layers)))
              for i in range(0, cfg.num_hidden_layers, layers_per_shard)]
    n = len(groups) + 1
    weight_map = {}
    for s, group in enumerate([None, *groups]):
        if group is None:
            t = {"model.embed_tokens.weight": rnd(cfg.vocab_size, h), "lm_head.weight": rnd(cfg.vocab_size, h),
                 "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
        else:
            t = {}
            for i in group:
                p = f"model.layers.{i}"
                shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                          "self_attn.o_proj": (h, h), "mlp.gate_proj": (m, h), "mlp.up_proj": (m, h),
                          "mlp.down_proj": (h, m)}
                t.update({f"{p}.{k}.weight": rnd(*v) for k, v in shapes.items()})
                t.update({f"{p}.{k}.weight": torch.ones(h, dtype=torch.bfloat16)
                          for k in ("input_layernorm", "post_attention_layernorm")})
        name = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        save_file(t, tmp / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(t, name))
    (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(tmp)
    for f in src.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, tmp / f.name)
    os.replace(tmp, out)
    return out


def measure(model: Path, out: Path, method: str, code: Path) -> dict:
    """Peak RSS of the converter process (ru_maxrss of that child alone) and wall time."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", "from converters.commands.cli import convert_main; convert_main()", str(model), str(out),
           "--method", method, "--nsamples", "4", "--seqlen", "128", "--refine", "none"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=dict(os.environ, TQDM_DISABLE="1"), stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, whatever ran before it
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    peak = usage.ru_maxrss
    return {"seconds": time.perf_counter() - t0, "peak_rss": peak * 1024, "model_bytes": weight_bytes(model),
            "out_bytes": weight_bytes(out)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("convert_memory", description=__doc__)
    p.add_argument("--model", choices=["default", "synthetic-3b"], required=True)
    p.add_argument("--method", default="magnitude")
    p.add_argument("--work", default="out/bench-memory", help="where the synthetic model and outputs go")
    p.add_argument("--code", default=".", help="checkout whose converter runs (default: this one)")
    p.add_argument("--label", default="this commit")
    p.add_argument("--doc", help="append the row to this markdown file's convert-memory section")
    a = p.parse_args(argv)
    work = Path(a.work).resolve()
    load = os.getloadavg()[0]
    model = default_model_dir() if a.model == "default" else synthetic_llama(work / "synthetic-3b")
    r = measure(model, work / f"out-{a.model}", a.method, Path(a.code).resolve())
    row = (f"| {a.model} | {a.label} | {r['model_bytes'] / 1e9:.2f} | {r['peak_rss'] / 1e9:.2f} | "
           f"{r['peak_rss'] / r['model_bytes']:.2f} | {r['seconds']:.0f} |")
    print(row)
    if a.doc:
        rows_file = work / "rows.json"
        rows = json.loads(rows_file.read_text()) if rows_file.is_file() else {}
        rows[f"{a.model}/{a.label}"] = row
        rows_file.write_text(json.dumps(rows, indent=1))
        write_section(a.doc, "convert-memory", "\n".join(
            ["| model | converter | model GB | peak RSS GB | RSS / model | seconds |", "|---|---|---|---|---|---|",
             *rows.values(), *footer(load, f"python -m benchmarks.convert_memory --model {a.model} --method "
                                           f"{a.method} --label '{a.label}' [--code CHECKOUT] --doc {a.doc}")]))


if __name__ == "__main__":
    main()
