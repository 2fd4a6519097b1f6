"""Everything the converter can check before long work: paths, the model, options, the text, the disk.

Each check raises a ValueError/OSError whose message names the option or file and says what was
expected; the CLI prints it as one ``error:`` line. Nothing here writes to disk.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from compressed_tensors.utils.match import match_name
from torch import nn

from armor_vllm.format import (COLUMN_PARALLEL, FUSED_SHARDS, ROW_PARALLEL, rank_width_problems, safetensors_files,
                               valid_block_sizes)

from .loader import listed
from .writer import CHECKPOINT_EXTRAS

# What a Hugging Face or ARMOR checkpoint directory holds; --overwrite replaces nothing else.
CHECKPOINT_FILES = ("*.safetensors", "*.json", "*.jinja", "*.model", "loss_curve.png", ".gitattributes",
                    *CHECKPOINT_EXTRAS)


def matches(name: str, patterns: list[str]) -> bool:
    """compressed-tensors' (and vLLM's) rule: an exact module name or a 're:' regex."""
    return any(match_name(name, p) for p in patterns)


def _within(a: Path, b: Path) -> bool:
    """a is b or lies inside b (after resolving links)."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_paths(model_dir: Path, out_dir: Path, work_dir: Path, overwrite: bool) -> None:
    """Refuse any layout where writing the output or the work files could touch the source or each other."""
    for a, b, what in ((out_dir, model_dir, "the output directory is (inside) the input model directory"),
                       (model_dir, out_dir, "the input model lies inside the output directory"),
                       (work_dir, out_dir, "the work directory lies inside the output directory"),
                       (out_dir, work_dir, "the output directory lies inside the work directory"),
                       (model_dir, work_dir, "the input model lies inside the work directory")):
        if _within(a, b):
            raise ValueError(f"{out_dir}: {what} ({model_dir} -> {out_dir}, work {work_dir}); "
                             "choose an output directory beside the model")
    if out_dir.exists() or out_dir.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{out_dir}: output directory exists (pass --overwrite to replace it)")
        check_replaceable(out_dir)


def check_replaceable(out_dir: Path) -> None:
    """--overwrite replaces a model checkpoint directory and nothing else: name whatever else is there."""
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a directory; --overwrite replaces only a checkpoint directory")
    if not (out_dir / "config.json").is_file():
        raise FileExistsError(f"{out_dir}: --overwrite replaces only a Hugging Face/ARMOR checkpoint directory, "
                              "and this one has no config.json; move its contents or choose another output directory")
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir()
                     if p.is_dir() or not listed(p.name, CHECKPOINT_FILES))
    if foreign:
        raise FileExistsError(f"{out_dir}: holds files that are not part of a checkpoint ({', '.join(foreign[:5])}"
                              f"{', …' if len(foreign) > 5 else ''}); --overwrite would delete them. "
                              "Move them or choose another output directory")


def read_hf_config(model_dir: Path) -> dict:
    """config.json of a causal-LM safetensors directory, with every shard's header readable."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory does not exist")
    cfg_file = model_dir / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; expected a Hugging Face model directory")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    archs = config.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise ValueError(f"{cfg_file}: architectures {archs} is not a causal language model "
                         "(expected e.g. LlamaForCausalLM or Qwen2ForCausalLM)")
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "?")
        raise ValueError(f"{cfg_file}: the model is already quantized ({method}); convert the dense original")
    safetensors_files(model_dir)  # every shard readable, the index in agreement with them
    return config


def check_layers(layers: list[int] | None, n_layers: int, where: Path) -> None:
    bad = [i for i in layers or [] if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"--layers: {bad} out of range; {where} has decoder layers 0-{n_layers - 1}")


def check_device(device: str) -> None:
    """cpu, cuda or cuda:i for a GPU this process can see."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: expected cpu, cuda or cuda:i") from None
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise ValueError(f"--device {device}: expected cpu, cuda or cuda:i")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible to PyTorch here (torch {torch.__version__}); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")


def check_ignore(ignore: list[str], linear_names: list[str]) -> None:
    """Every pattern matches some linear, and fused groups (q/k/v, gate/up) are ignored all or none."""
    for p in ignore:
        if not any(match_name(n, p) for n in linear_names):
            hint = f"; did you mean re:.*{p}?" if not p.startswith("re:") else ""
            raise ValueError(f"--ignore {p}: matches no linear of the model (patterns are exact module names such "
                             f"as {linear_names[0]}, or re:REGEX, as in compressed-tensors and vLLM){hint}")
    names = set(linear_names)
    for n in linear_names:
        head, _, proj = n.rpartition(".")
        for shards in FUSED_SHARDS.values():
            if proj == shards[0]:
                group = [f"{head}.{s}" for s in shards if f"{head}.{s}" in names]
                ignored = [g for g in group if matches(g, ignore)]
                if ignored and len(ignored) < len(group):
                    raise ValueError(f"--ignore splits a fused group: {', '.join(ignored)} ignored but not "
                                     f"{', '.join(g for g in group if g not in ignored)}; vLLM runs them as one "
                                     "layer, so ignore all of them or none")


def check_shapes(targets: dict[str, tuple[int, nn.Linear]], block_size: int | None) -> None:
    dims = sorted({d for _, m in targets.values() for d in m.weight.shape})
    for name, (_, m) in targets.items():
        n, k = m.weight.shape
        if k % 8:
            raise ValueError(f"{name}: input dimension K={k} is not a multiple of 8 (2:4 packing needs K % 8 == 0)")
        if block_size and (n % block_size or k % block_size):
            raise ValueError(f"--block-size {block_size} does not divide {name}'s N={n} and K={k}; "
                             f"valid block sizes for this model: {valid_block_sizes(dims)}")


def tensor_parallel_refusals(hf_config: dict, shapes: dict[str, tuple[int, int]], block_size: int | None,
                             up_to: int = 8) -> dict[int, str | None]:
    """For each tensor-parallel size 1..up_to, why vLLM would refuse to load the checkpoint (None: it loads).

    ``shapes`` are the compressed linears' (N, K) by HF name. vLLM itself needs the attention heads to
    split evenly, the KV heads to split evenly or, with more ranks than KV heads, to be replicated to them
    (QKVParallelLinear), and the intermediate size to split; the plugin then needs each rank's slice to hold
    whole blocks (format.rank_width_problems): column-parallel linears keep K and get N/tp rows (k/v: their
    heads' rows), row-parallel ones keep N and get K/tp inputs.
    """
    return {tp: next(_tensor_parallel_problems(hf_config, shapes, block_size, tp), None) for tp in range(1, up_to + 1)}


def _tensor_parallel_problems(hf_config: dict, shapes: dict[str, tuple[int, int]], block_size: int | None, tp: int):
    heads = hf_config["num_attention_heads"]
    kv = hf_config.get("num_key_value_heads") or heads
    inter = hf_config.get("intermediate_size", 0)
    if heads % tp:
        yield f"num_attention_heads {heads} is not a multiple of {tp}"
    if (kv % tp) if kv >= tp else (tp % kv):
        yield f"num_key_value_heads {kv} neither splits over {tp} ranks nor replicates to them"
    if inter % tp:
        yield f"intermediate_size {inter} is not a multiple of {tp}"
    if tp == 1:
        return  # nothing is split
    for name, (n, k) in shapes.items():
        proj = name.rpartition(".")[2]
        if proj in ROW_PARALLEL:
            k, widths = k // tp, [n]
        elif proj in ("k_proj", "v_proj"):
            widths = [n // kv * max(1, kv // tp)]
        elif proj in COLUMN_PARALLEL:
            widths = [n // tp]
        else:
            yield f"{name}: how vLLM splits this linear across ranks is not known here"
            continue
        for problem in rank_width_problems(k, widths, block_size):
            yield f"{name}: {problem} on each of {tp} ranks"


def check_finite(targets: dict, read, model_dir: Path) -> None:
    """Every target weight is finite, read one tensor at a time (the whole model is never in memory)."""
    for name in targets:
        if not torch.isfinite(read([f"{name}.weight"])[0]).all():
            raise FloatingPointError(f"{model_dir}: weight of {name} contains NaN/Inf")


def check_tokens(samples: torch.Tensor, vocab_size: int, model_dir: Path) -> None:
    """The tokenizer's ids must index the embedding table."""
    top = int(samples.max())
    if top >= vocab_size:
        raise ValueError(f"{model_dir}: the tokenizer produced token id {top}, but config.json vocab_size is "
                         f"{vocab_size}; the tokenizer files do not belong to this model")


def check_disk(out_dir: Path, need: int) -> None:
    parent = next(p for p in [out_dir.resolve(), *out_dir.resolve().parents] if p.exists())
    free = shutil.disk_usage(parent).free
    if free < need:
        raise OSError(f"{parent}: {free / 2**30:.1f} GiB free, the checkpoint and work files need about {need / 2**30:.1f} GiB")


def disk_needed(source_bytes: int, dtype: torch.dtype, extra: int = 0) -> int:
    """The output checkpoint (at most the source's size) plus the work files: per parameter the kept
    half in fp32 (2 bytes) and its bitmask bit, with the B blocks well under the rest; plus ``extra``
    bytes (statistics, spilled activations)."""
    return source_bytes + source_bytes // dtype.itemsize * 9 // 4 + extra
