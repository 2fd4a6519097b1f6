"""End-to-end: tiny ARMOR checkpoints served by vLLM must generate exactly what their dense twins do.

Most engines run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, eager, fp32, ``uni``
executor: ~5 s each); vLLM tolerates several in a row once ``cleanup_dist_env_and_memory``
runs between them. The compiled multiprocess engine and the TP=2 engine run in a subprocess
(:func:`run_in_subprocess`) so their process trees and environment stay out of pytest.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from tests import tiny_models  # noqa: E402

MAX_TOKENS = 12
BASE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
            "TOKENIZERS_PARALLELISM": "false"}
EAGER = dict(enforce_eager=True, distributed_executor_backend="uni")


# ---------------------------------------------------------------- importable engine helpers
@contextlib.contextmanager
def engine(model, env: dict | None = None, **llm_kwargs):
    """An ``LLM`` for a tiny model (fp32, max_model_len 256) with ``env`` set while it lives."""
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    saved = {k: os.environ.get(k) for k in {**BASE_ENV, **(env or {})}}
    os.environ.update({**BASE_ENV, **(env or {})})
    llm = None
    try:
        llm = LLM(model=str(model), dtype="float32", max_model_len=256, max_num_seqs=4, seed=0, **llm_kwargs)
        yield llm
    finally:
        del llm
        cleanup_dist_env_and_memory()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def greedy(llm) -> dict:
    """Greedy token ids and their logprobs for tiny_models.PROMPTS."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    tokens, logprobs = [], []
    for out in llm.generate(tiny_models.PROMPTS, params, use_tqdm=False):
        c = out.outputs[0]
        tokens.append(list(c.token_ids))
        logprobs.append([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
    return {"tokens": tokens, "logprobs": logprobs}


def quant_method_names(model) -> dict[str, str]:
    """``apply_model`` callback: vLLM module name -> quant method class, for linear layers."""
    return {name: type(m.quant_method).__name__ for name, m in model.named_modules()
            if hasattr(m, "quant_method") and name.endswith("proj")}


def input_transform_slots(model) -> dict[str, int]:
    """``apply_model`` callback: how many b_in slots each ARMOR layer kept after loading."""
    return {name: m.b_in.shape[0] for name, m in model.named_modules() if getattr(m, "b_in", None) is not None}


def run_greedy(model, env: dict | None = None, **llm_kwargs) -> dict:
    with engine(model, env, **llm_kwargs) as llm:
        return greedy(llm)


def run_in_subprocess(model, env: dict, timeout: float = 400, **llm_kwargs) -> dict:
    """:func:`run_greedy` in a fresh interpreter (own engine processes and environment)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import tests.test_vllm_engine as t\n"
            "if __name__ == '__main__':\n"
            "    r = t.run_greedy(sys.argv[2], **json.loads(sys.argv[3]))\n"
            "    print('RESULT ' + json.dumps(r))\n")
    args = json.dumps(dict(llm_kwargs))
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parents[1]), str(model), args],
                          env={**os.environ, **BASE_ENV, **env}, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"engine subprocess failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def assert_same_generation(got: dict, want: dict, atol: float = 1e-3) -> None:
    assert got["tokens"] == want["tokens"]
    for g, w in zip(got["logprobs"], want["logprobs"]):
        assert g == pytest.approx(w, abs=atol)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def _vllm_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(model_type, **build_kwargs) -> TinyCheckpoint, each variant built once per module."""

    @lru_cache(maxsize=None)
    def build(model_type: str = "llama", **kw) -> tiny_models.TinyCheckpoint:
        return tiny_models.build(tmp_path_factory.mktemp(model_type), model_type, **kw)

    return build


@pytest.fixture(scope="module")
def dense_result(tiny):
    """dense_result(model_type, **build_kwargs): greedy generation of the dense twin (cached)."""
    return lru_cache(maxsize=None)(lambda model_type="llama", **kw: run_greedy(tiny(model_type, **kw).dense, **EAGER))


@pytest.fixture(scope="module")
def armor_result(tiny):
    """armor_result(model_type, backend): the ARMOR checkpoint's generation (cached)."""

    @lru_cache(maxsize=None)
    def run(model_type: str = "llama", backend: str = "auto") -> dict:
        return run_greedy(tiny(model_type).armor, {"ARMOR_VLLM_BACKEND": backend}, quantization="armor", **EAGER)

    return run


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_armor_matches_dense_twin(model_type, armor_result, dense_result):
    assert_same_generation(armor_result(model_type), dense_result(model_type))


def test_sandwich_backend_equals_fold(armor_result):
    # fp32 models always get the fold backend under "auto" (2:4 kernels need fp16/bf16)
    assert_same_generation(armor_result(backend="sandwich"), armor_result(backend="auto"), atol=1e-4)


def test_shared_input_transform_collapses_to_one_gemm(tiny, dense_result):
    ckpt = tiny("llama", shared_input_transform=True)
    with engine(ckpt.armor, {"ARMOR_VLLM_BACKEND": "sandwich"}, quantization="armor", **EAGER) as llm:
        slots = llm.apply_model(input_transform_slots)[0]
        got = greedy(llm)
    assert slots and set(slots.values()) == {1}, slots
    assert_same_generation(got, dense_result("llama", shared_input_transform=True))


def test_quantization_autodetected_for_baseline_without_blocks(tiny, dense_result):
    """No --quantization flag: config.json's quant_method selects "armor"; block_size null: S only."""
    ckpt = tiny("llama", block_size=None, method="magnitude")
    with engine(ckpt.armor, **EAGER) as llm:
        assert set(llm.apply_model(quant_method_names)[0].values()) == {"ArmorLinearMethod"}
        got = greedy(llm)
    assert_same_generation(got, dense_result("llama", block_size=None, method="magnitude"))


IGNORED = ("lm_head", "model.layers.0.mlp.down_proj",
           "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj")


def test_ignored_layers_stay_dense(tiny, dense_result):
    ckpt = tiny("llama", ignore=IGNORED)
    with engine(ckpt.armor, quantization="armor", **EAGER) as llm:
        methods = llm.apply_model(quant_method_names)[0]
        got = greedy(llm)
    dense = {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.qkv_proj"}
    assert {n for n, m in methods.items() if m == "UnquantizedLinearMethod"} == dense, methods
    assert {m for n, m in methods.items() if n not in dense} == {"ArmorLinearMethod"}, methods
    assert_same_generation(got, dense_result("llama", ignore=IGNORED))


def _drop(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


def _replace(name, fn):
    return lambda t: {**t, name: fn(t[name])}


def _break_24(bitmask):
    bitmask = bitmask.clone()
    bitmask[0, 0] = 0x0F  # columns 0..3 keep all four
    return bitmask


def _format_version_2(config):
    return {**config, "quantization_config": {**config["quantization_config"], "format_version": 2}}


BAD = {
    "missing-tensor": (dict(tensors_fn=_drop("model.layers.1.self_attn.k_proj.b_in")),
                       r"model\.layers\.1\.self_attn\.k_proj\.b_in: never loaded"),
    "wrong-shape": (dict(tensors_fn=_replace("model.layers.0.self_attn.v_proj.weight_values", lambda v: v[:, :-4])),
                    r"model\.layers\.0\.self_attn\.v_proj\.weight_values: checkpoint tensor .*\[128, 124\]"),
    "not-2:4": (dict(tensors_fn=_replace("model.layers.1.mlp.up_proj.weight_bitmask", _break_24)),
                r"model\.layers\.1\.mlp\.up_proj\.weight_bitmask.*row 0, columns 0\.\.3 keep 4"),
    "format-version-2": (dict(config_fn=_format_version_2), r"format_version=2"),
    "quantization-config-removed": (dict(config_fn=_drop("quantization_config")),
                                    r"config\.json has no quantization_config.*removed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_fails_at_load_naming_the_tensor(case, tmp_path, tiny):
    edits, message = BAD[case]
    bad = tiny_models.edit_checkpoint(tiny().armor, tmp_path / "bad", **edits)
    with pytest.raises(Exception, match=message):
        run_greedy(bad, quantization="armor", **EAGER)


def test_compiled_multiprocess_engine(tmp_path, tiny, dense_result):
    """The default serving path: torch.compile (fullgraph, custom op) and a separate engine process."""
    got = run_in_subprocess(tiny().armor, {"ARMOR_VLLM_BACKEND": "sandwich", "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                                           "VLLM_CACHE_ROOT": str(tmp_path)}, quantization="armor")
    assert_same_generation(got, dense_result())


def test_tensor_parallel_2(tmp_path, tiny, dense_result):
    """b=32 divides every per-rank width at TP=2 (head_dim 64, intermediate/2, hidden/2)."""
    got = run_in_subprocess(tiny().armor, {"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_CACHE_ROOT": str(tmp_path)},
                            quantization="armor", tensor_parallel_size=2, enforce_eager=True)
    assert_same_generation(got, dense_result())
