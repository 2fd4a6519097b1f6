"""Perplexity, one protocol everywhere: non-overlapping windows (default 2048 tokens), fp32 logits,
mean NLL over every predicted token. Works on dense HF directories and on ARMOR checkpoints
(through armor_vllm's transformers quantizer, the loader every HF user gets), and through vLLM
(prompt logprobs, :mod:`converters.evaluation.vllm_eval`).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

import armor_vllm  # noqa: F401  (registers quant_method "armor" with transformers)

from converters.data import load_text, tokenize, windows
from converters.progress import progress
from .scores import PerplexityResult

__all__ = ["PerplexityResult", "check_model_dir", "load_hf_model", "perplexity", "perplexity_hf"]


def check_model_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face model directory")
    return path


def load_hf_model(path: str | Path, dtype: torch.dtype = torch.float32):
    """A transformers causal LM for a dense HF directory or an ARMOR checkpoint (ArmorLinear modules)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(check_model_dir(path), dtype=dtype).eval()


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
    return PerplexityResult.from_sum(total, count, len(win), seqlen, data, "hf", t0)


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
