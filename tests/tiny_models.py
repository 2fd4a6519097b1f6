"""Tiny random checkpoints for tests: an ARMOR checkpoint plus its dense twin (W = reconstruct).

No hub access: the tokenizer is a byte-level BPE trained here on a few sentences. The ARMOR
checkpoint gets random 2:4 masks over the random weights and random near-identity b_in/b_out,
written through :mod:`armor_vllm.format`, so both halves of the project read the same bytes.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from armor_vllm import format as fmt
from converters.conversion.methods.masks import two_four_mask
from converters.conversion.methods.quantize import quantize_rows

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model that only exists for tests still needs a tokenizer.",
    "Sparse matrices keep two of every four weights; the block diagonal factors fix the rest.",
    "Once upon a time there was a little language model that could not be downloaded.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 and symbols like + - * / = also appear in text.",
]
PROMPTS = ["The quick brown fox", "Once upon a time", "Sparse matrices keep", "Numbers like 0 1 2"]
ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
FUSED_GROUPS = tuple(fmt.FUSED_SHARDS.values())


@dataclass
class TinyCheckpoint:
    armor: Path   # the ARMOR checkpoint (quant_method "armor" in config.json)
    dense: Path   # its dense twin: same model with every compressed linear reconstructed


def save_tokenizer(out: Path, vocab_size: int = 1024) -> None:
    """Train a byte-level BPE on CORPUS and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out)


def hf_config(model_type: str, vocab_size: int = 1024):
    from transformers import AutoConfig

    kw = dict(initializer_range=0.1, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, architectures=[ARCHS[model_type]])
    if model_type == "qwen3":
        kw["head_dim"] = 64
    return AutoConfig.for_model(model_type, **kw)


def tiny_dense(tmp: Path, model_type: str = "llama", edit=None, vocab_size: int = 1024) -> Path:
    """A random tiny HF model directory ``tmp/dense-<model_type>`` with a local tokenizer of 1024 tokens."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(model_type, vocab_size), dtype=torch.float32)
    if edit:
        edit(model)
    out = tmp / f"dense-{model_type}"
    model.save_pretrained(out)
    save_tokenizer(out)
    return out


def resharded(src: Path, out: Path) -> Path:
    """The same model saved as several shards with an index."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src).save_pretrained(out, max_shard_size="4MB")
    for f in src.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    assert len(list(out.glob("*.safetensors"))) >= 2
    return out


def random_24_mask(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1)[..., :2]
    return torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)


def near_identity(n_blocks: int, b: int, gen: torch.Generator, scale: float = 0.05) -> torch.Tensor:
    return torch.eye(b) + scale * torch.randn(n_blocks, b, b, generator=gen)


# random_layer's default: a fused q/k/v layer on one rank (K = 64, blocks of 8)
B = 8
K = 64
SHARDS = [32, 16, 16]


def random_layer(n_slots: int, blocks: bool = True, shards=SHARDS, k=K, dtype=torch.float32, device="cpu", b=B):
    """(S dense [N, K], values, bitmask, b_in [n_slots, K/b, b, b], b_out [N/b, b, b])."""
    gen = torch.Generator().manual_seed(0)
    n = sum(shards)
    mask = random_24_mask(n, k, gen)
    w = torch.randn(n, k, generator=gen) * mask
    values, bitmask = fmt.pack_24(w, mask)
    b_in = torch.stack([near_identity(k // b, b, gen, 0.2) for _ in range(n_slots)]) if blocks else None
    b_out = near_identity(n // b, b, gen, 0.2) if blocks else None
    to = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return to(fmt.unpack_24(values, bitmask)), values, bitmask, to(b_in), to(b_out)


def build(out_dir: str | Path, model_type: str = "llama", block_size: int | None = 32,
          shared_input_transform: bool = False, ignore: tuple[str, ...] = ("lm_head",), seed: int = 0,
          method: str = "armor", scheme: str = "none") -> TinyCheckpoint:
    """Write ``out_dir/armor`` and ``out_dir/dense`` for a random tiny ``model_type`` model.

    ``ignore`` lists HF module names kept dense; ``shared_input_transform`` gives q/k/v (and
    gate/up) one b_in; ``block_size=None`` is a baseline method without b_in/b_out; ``scheme="W8A16"``
    stores int8 kept values with a per-row scale.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(model_type), dtype=torch.float32)
    for m in model.modules():  # HF zero-initialises biases; random ones exercise the bias path
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.bias.data.normal_(0, 0.05, generator=gen)
    write_random_armor(model, out / "armor", gen, block_size, shared_input_transform, ignore, method, save_tokenizer,
                       scheme=scheme)
    write_dense_twin(out / "armor", out / "dense")
    return TinyCheckpoint(out / "armor", out / "dense")


def armor_twin_of(model_dir: Path, out_dir: Path, layers: tuple[int, ...] = (0, 1), block_size: int = 32,
                  seed: int = 0) -> Path:
    """An ARMOR checkpoint of a real HF model in seconds: magnitude 2:4 masks and random
    near-identity blocks on ``layers`` only.

    For tests that need a real tokenizer, text and context length (lm-eval, long windows); the
    model stays close to the source (perplexity within a few times), but nothing is optimised.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    keep = tuple(f"model.layers.{i}." for i in layers)
    ignore = tuple(nm for nm, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not nm.startswith(keep))
    copy_extras = lambda tmp: shutil.copytree(model_dir, tmp, dirs_exist_ok=True,  # noqa: E731
                                              ignore=shutil.ignore_patterns("*.safetensors*", "config.json"))
    write_random_armor(model, out_dir, torch.Generator().manual_seed(seed), block_size, ignore=ignore,
                       save_extras=copy_extras, magnitude_masks=True, scale=0.002)
    return out_dir


def write_random_armor(model, out: Path, gen: torch.Generator, block_size: int | None = 32,
                       shared_input_transform: bool = False, ignore: tuple[str, ...] = ("lm_head",),
                       method: str = "armor", save_extras=None, magnitude_masks: bool = False,
                       scale: float = 0.05, scheme: str = "none") -> None:
    """Compress every nn.Linear of ``model`` not in ``ignore`` with a 2:4 mask (random, or the 2
    largest magnitudes of each group) and random near-identity b_in/b_out (``scale`` off the
    identity), and write the result through :mod:`armor_vllm.format`."""
    tensors, shared = {}, {}
    linears = {nm for nm, m in model.named_modules() if isinstance(m, torch.nn.Linear) and nm not in ignore}
    state = model.state_dict()
    for name, t in state.items():
        prefix, _, suffix = name.rpartition(".")
        if name in model.all_tied_weights_keys:
            continue  # stored once, under the name it is tied to (as save_pretrained does)
        if prefix not in linears:
            tensors[name] = t.contiguous()
            continue
        if suffix == "bias":
            continue  # stored by layer_tensors below
        n, k = t.shape
        b_in = b_out = None
        if block_size is not None:
            group = next((g for g in FUSED_GROUPS if prefix.rsplit(".", 1)[-1] in g), None)
            key = (prefix.rsplit(".", 1)[0], group) if shared_input_transform and group else prefix
            if key not in shared:
                shared[key] = near_identity(k // block_size, block_size, gen, scale)
            b_in = shared[key]
            b_out = near_identity(n // block_size, block_size, gen, scale)
        mask = two_four_mask(t.abs()) if magnitude_masks else random_24_mask(n, k, gen)
        bias = state.get(f"{prefix}.bias")
        core, row_scale = t * mask, None
        if scheme == "W8A16":
            q = quantize_rows(core)
            core, row_scale = q.codes, q.scale
        tensors.update(fmt.layer_tensors(prefix, core, b_in=b_in, b_out=b_out, bias=bias, mask=mask, dtype=t.dtype,
                                         scale=row_scale))
    qcfg = fmt.ArmorQuantizationConfig.with_scheme(scheme, block_size=block_size, method=method, ignore=list(ignore),
                                                   shared_input_transform=shared_input_transform)
    cfg = json.loads(model.config.to_json_string())
    cfg["dtype"] = "float32"
    fmt.write_checkpoint(out, tensors, cfg, qcfg, save_extras=save_extras, overwrite=True)


def write_dense_twin(armor_dir: Path, dense_dir: Path) -> None:
    """A plain HF directory whose linears are the ARMOR checkpoint's reconstructed weights."""
    ckpt = fmt.read_checkpoint(armor_dir)
    shutil.rmtree(dense_dir, ignore_errors=True)
    shutil.copytree(armor_dir, dense_dir, ignore=shutil.ignore_patterns("*.safetensors", fmt.INDEX_FILE, "config.json"))
    save_file(ckpt.dense_state_dict(), dense_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = dict(ckpt.config)
    del cfg["quantization_config"]
    (dense_dir / "config.json").write_text(json.dumps(cfg, indent=2))


def edit_checkpoint(src: Path, dst: Path, tensors_fn: Callable[[dict], dict] | None = None,
                    config_fn: Callable[[dict], dict] | None = None) -> Path:
    """Copy a checkpoint and rewrite its tensors and/or config.json, bypassing validation.

    Used to make deliberately broken checkpoints; the index is rewritten to match the tensors.
    """
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    if tensors_fn is not None:
        index = json.loads((dst / fmt.INDEX_FILE).read_text())
        files = sorted(set(index["weight_map"].values()))
        tensors = tensors_fn({nm: t for f in files for nm, t in load_file(dst / f).items()})
        for f in files:
            (dst / f).unlink()
        save_file({nm: t.contiguous() for nm, t in tensors.items()}, dst / files[0], metadata={"format": "pt"})
        index["weight_map"] = dict.fromkeys(tensors, files[0])
        (dst / fmt.INDEX_FILE).write_text(json.dumps(index, indent=2))
    if config_fn is not None:
        (dst / "config.json").write_text(json.dumps(config_fn(json.loads((dst / "config.json").read_text())), indent=2))
    return dst
