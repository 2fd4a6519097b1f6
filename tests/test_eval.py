"""Perplexity: the protocol on a known case, and vLLM (prompt logprobs) against transformers."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from converters.data import windows
from converters.evaluation.evaluate import load_hf_model, perplexity, perplexity_hf
from tests.tiny_models import CORPUS, build


class Uniform(torch.nn.Module):
    """A 'model' whose logits are all equal: its perplexity is exactly the vocabulary size."""

    def forward(self, ids, use_cache=False):
        return type("Out", (), {"logits": torch.zeros(*ids.shape, 50)})()


def test_protocol_on_uniform_model():
    ids = torch.randint(0, 50, (1000,))
    r = perplexity_hf(Uniform(), ids, seqlen=128, data="x")
    assert r.windows == 7 and r.tokens == 7 * 127
    assert math.isclose(r.ppl, 50.0, rel_tol=1e-6)
    assert windows(ids, 128, max_windows=2).shape == (2, 128)
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(ids[:10], 128)


def test_armor_dir_reconstructs_in_transformers(tmp_path):
    tiny = build(tmp_path, "qwen2")
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        a, d = load_hf_model(tiny.armor)(ids).logits, load_hf_model(tiny.dense)(ids).logits
    torch.testing.assert_close(a, d, rtol=1e-4, atol=1e-4)  # any CPU kernel


def test_vllm_perplexity_matches_transformers(tmp_path):
    pytest.importorskip("vllm")
    tiny = build(tmp_path, "llama")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(CORPUS * 8))
    hf = perplexity(tiny.armor, str(text), seqlen=64, max_windows=4)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    out = subprocess.run([Path(sys.executable).with_name("armor-eval"), "ppl", tiny.armor, "--data", text,
                          "--seqlen", "64", "--max-windows", "4", "--backend", "vllm", "--json"],
                         env=env, capture_output=True, text=True, check=True)
    vllm = json.loads(out.stdout.strip().splitlines()[-1])
    assert vllm["tokens"] == hf.tokens and vllm["backend"] == "vllm"
    assert abs(vllm["ppl"] / hf.ppl - 1) < 0.01, (vllm["ppl"], hf.ppl)
