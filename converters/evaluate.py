"""Perplexity, one protocol everywhere: non-overlapping windows (default 2048 tokens), fp32 logits,
mean NLL over every predicted token. Works on dense HF directories and on ARMOR checkpoints
(reconstructing W = B_out·S·B_in inside transformers), and through vLLM (prompt logprobs).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from armor_vllm.format import read_checkpoint

from .data import load_text, tokenize, windows
from .progress import progress


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    data: str
    backend: str
    seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def is_armor_dir(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and json.loads(cfg.read_text()).get("quantization_config", {}).get("quant_method") == "armor"


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face model directory")
    return path


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers causal LM for a dense HF directory or an ARMOR checkpoint (reconstructed dense)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = check_model_dir(path)
    if not is_armor_dir(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ckpt = read_checkpoint(path, validate=True)
    cfg_dict = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = ckpt.dense_state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = {k for k in missing if k.endswith("lm_head.weight")}
    missing = [k for k in missing if k not in tied and "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match {config.architectures}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        model.tie_weights()
    return model.to(dtype).eval()


@torch.no_grad()
def perplexity_hf(model, ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                  device: str = "cpu", data: str = "") -> PerplexityResult:
    """Mean NLL over all predicted tokens of the non-overlapping windows, logits in fp32."""
    t0 = time.perf_counter()
    win = windows(ids, seqlen, max_windows)
    model.to(device)
    total, count = 0.0, 0
    for w in progress(win, desc="perplexity", unit="window"):
        logits = model(w[None].to(device), use_cache=False).logits[0].float()
        total += F.cross_entropy(logits[:-1], w[1:].to(device), reduction="sum").item()
        count += seqlen - 1
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, len(win), seqlen, data, "hf", time.perf_counter() - t0)


def perplexity(model_dir: str | Path, data: str = "wiki-test", seqlen: int = 2048, max_windows: int | None = None,
               backend: str = "hf", device: str = "cpu") -> PerplexityResult:
    """Perplexity of a model directory on `data` (see data.load_text), with the hf or vllm backend."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(check_model_dir(model_dir))
    ids = tokenize(tok, load_text(data, role="test"))
    if backend == "vllm":
        from .vllm_eval import perplexity_vllm

        return perplexity_vllm(model_dir, ids, seqlen, max_windows, data)
    if backend != "hf":
        raise ValueError(f"backend {backend!r}: expected 'hf' or 'vllm'")
    return perplexity_hf(load_hf_model(model_dir), ids, seqlen, max_windows, device, data)
