"""Perplexity through vLLM: the same windows as the transformers path, scored from prompt logprobs.

This is what proves that the served model is the converted one: `armor-eval ppl DIR --backend vllm`
must agree with `--backend hf` (armor_vllm's transformers quantizer).
"""
from __future__ import annotations

import os
import time

import torch

from converters.data import windows
from .scores import PerplexityResult


def perplexity_vllm(model_dir, ids: torch.Tensor, seqlen: int, max_windows: int | None, data: str,
                    dtype: str = "float32", enforce_eager: bool = True) -> PerplexityResult:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    win = windows(ids, seqlen, max_windows)
    llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=seqlen + 1, enforce_eager=enforce_eager,
              max_num_batched_tokens=max(seqlen + 1, 2048), max_num_seqs=4)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w.tolist()) for w in win], params, use_tqdm=False)
    total, count = 0.0, 0
    for w, out in zip(win, outs):
        for pos in range(1, seqlen):
            total -= out.prompt_logprobs[pos][int(w[pos])].logprob
            count += 1
    return PerplexityResult.from_sum(total, count, len(win), seqlen, data, "vllm", t0)
