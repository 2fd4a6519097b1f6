"""`armor-eval ppl --backend vllm` with the 2:4 CPU kernel agrees with transformers (issue #8: within 0.5%).

The checkpoint is the default model with decoder layers 0-1 in ARMOR form (magnitude masks, random
near-identity blocks; every linear shape and the per-shard B_in of fused q/k/v and gate/up),
scored on real text: the model still predicts well, so a wrong kernel result shows as a large
perplexity change rather than hiding in near-uniform logits. The transformers side runs the fold,
the reference that multiplies B_out·S·B_in out; both in fp32.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from armor_vllm.kernels import sparse_cpu
from converters.evaluation.evaluate import perplexity
from tests import tiny_models

pytestmark = pytest.mark.vllm
SEQLEN, WINDOWS = 256, 4


@pytest.mark.skipif(not sparse_cpu.loaded_levels(), reason="no 2:4 CPU kernel on this machine")
def test_vllm_sparse_cpu_perplexity_matches_transformers(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    from converters.commands.default_model import default_model_dir

    ckpt = tiny_models.armor_twin_of(default_model_dir(), tmp_path / "armor", block_size=64)
    monkeypatch.setenv("ARMOR_VLLM_BACKEND", "fold")
    hf = perplexity(ckpt, "wiki-test", seqlen=SEQLEN, max_windows=WINDOWS)
    env = dict(os.environ, ARMOR_VLLM_BACKEND="sparse_cpu", VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = subprocess.run([Path(sys.executable).with_name("armor-eval"), "ppl", ckpt, "--data", "wiki-test", "--seqlen",
                          str(SEQLEN), "--max-windows", str(WINDOWS), "--backend", "vllm", "--json"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-6000:]
    assert "ARMOR: sparse_cpu backend" in out.stdout + out.stderr
    vllm = json.loads(out.stdout.strip().splitlines()[-1])
    assert vllm["tokens"] == hf.tokens
    assert abs(vllm["ppl"] / hf.ppl - 1) < 0.005, (vllm["ppl"], hf.ppl)
