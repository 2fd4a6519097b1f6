"""lm-evaluation-harness on ARMOR checkpoints, offline: the task ``armor_wiki_ppl`` (converters/evaluation/lm_eval_tasks)
through vLLM with the plugin, and through transformers with the quantizer, agrees with armor-eval's protocol
run on the dense model that the checkpoint's W_eff defines (built without the kernels under test)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from converters.data import load_text, tokenize
from converters.evaluation.evaluate import perplexity_hf
from converters.evaluation.harness import TASKS_DIR
from tests import independent, tiny_models

pytest.importorskip("lm_eval")
ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
       "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def armor_default(tmp_path_factory) -> Path:
    """The embedded default model (context 8192, real tokenizer) with decoder layers 0-1 in ARMOR form."""
    from converters.commands.default_model import default_model_dir

    return tiny_models.armor_twin_of(default_model_dir(), tmp_path_factory.mktemp("default") / "armor")


def lm_eval_ppl(command: list, model: str, model_args: str, out: Path, **metadata) -> float:
    """token_perplexity of armor_wiki_ppl as reported by an lm-eval command line."""
    proc = subprocess.run([*command, "--model", model, "--model_args", model_args, "--include_path", TASKS_DIR,
                           "--tasks", "armor_wiki_ppl", "--metadata", json.dumps(metadata), "--output_path", out],
                          env={**os.environ, **ENV}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    return results["results"]["armor_wiki_ppl"]["token_perplexity,none"]


def reference_ppl(ckpt: Path, data: str, seqlen: int, max_windows: int) -> float:
    """armor-eval's perplexity protocol on a plain transformers model whose linears hold W_eff rebuilt by plain
    torch (tests.independent): the reference goes through no ARMOR kernel and no armor_vllm code."""
    from transformers import AutoTokenizer

    ids = tokenize(AutoTokenizer.from_pretrained(ckpt), load_text(data, role="test"))
    return perplexity_hf(independent.dense_model(ckpt), ids, seqlen, max_windows).ppl


@pytest.mark.vllm
def test_lm_eval_through_vllm_agrees_with_armor_eval(armor_default, tmp_path):
    pytest.importorskip("vllm")
    args = f"pretrained={armor_default},quantization=armor,dtype=float32,max_model_len=2048,enforce_eager=True"
    got = lm_eval_ppl([Path(sys.executable).with_name("lm_eval")], "vllm", args, tmp_path, seqlen=1024, max_windows=2)
    want = reference_ppl(armor_default, "wiki-test", seqlen=1024, max_windows=2)
    # lm-eval also scores each document's first token (from the BOS prefix): ~1% higher here
    assert abs(got / want - 1) < 0.03, (got, want)


def test_lm_eval_through_transformers_agrees_with_armor_eval(tiny, tmp_path):
    """``python -m converters.evaluation.harness --model hf``: lm-eval's transformers path, with the quantizer registered."""
    ckpt = tiny("llama").armor
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(tiny_models.CORPUS * 40))
    got = lm_eval_ppl([sys.executable, "-m", "converters.evaluation.harness"], "hf", f"pretrained={ckpt},dtype=float32",
                      tmp_path / "out", data=str(text), seqlen=256, max_windows=4)
    want = reference_ppl(ckpt, str(text), seqlen=256, max_windows=4)
    assert abs(got / want - 1) < 0.03, (got, want)


def test_zero_shot_benchmark_skips_offline(tmp_path):
    """The paper's zero-shot tasks need the hub's datasets: offline the command says so and exits 0."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.zero_shot", tmp_path], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0 and not proc.stdout
    assert "zero-shot benchmark skipped" in proc.stderr and "HF_HUB_OFFLINE=1" in proc.stderr
