"""End-to-end: tiny ARMOR checkpoints served by vLLM must generate exactly what their dense twins do.

Most engines run in this process (see :mod:`tests.vllm_helpers`). The compiled multiprocess
engine and the TP=2 engine run in a subprocess (:func:`run_in_subprocess`) so their process
trees and environment stay out of pytest.
"""
from __future__ import annotations

from functools import lru_cache

import pytest

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("vllm_cache")]

from tests import tiny_models  # noqa: E402
from tests.vllm_helpers import (  # noqa: E402
    EAGER,
    armor_core_tensors,
    assert_same_generation,
    engine,
    greedy,
    input_transform_slots,
    quant_method_names,
    run_greedy,
    run_in_subprocess,
)


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
    assert_same_generation(armor_result(backend="sandwich"), armor_result(backend="fold"), atol=1e-4)


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


@pytest.mark.parametrize("backend", ["auto", "fold"])
def test_w8a16_matches_dense_twin(tiny, dense_result, backend):
    """int8 kept values (W8A16): the CPU kernel keeps them int8 in memory with an fp32 scale per row; the fold
    dequantizes at load. Both generate what the dense twin (W = B_out · (scale · values) · B_in) does."""
    ckpt = tiny("qwen2", scheme="W8A16")
    with engine(ckpt.armor, {"ARMOR_VLLM_BACKEND": backend}, quantization="armor", **EAGER) as llm:
        held = llm.apply_model(armor_core_tensors)[0]
        got = greedy(llm)
    assert len(held) == 8, held  # qkv, o, gate_up, down in two layers
    for name, t in held.items():
        if backend == "auto":
            (v_dtype, (n, _)), (s_dtype, s_shape) = t["weight_values"], t["weight_scale"]
            assert v_dtype == "torch.int8" and s_dtype == "torch.float32" and s_shape == [n], (name, t)
        else:
            assert t == {}, (name, t)  # folded to a dense weight
    assert_same_generation(got, dense_result("qwen2", scheme="W8A16"))


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


def _format_version_3(config):
    return {**config, "quantization_config": {**config["quantization_config"], "format_version": 3}}


BAD = {
    "missing-tensor": (dict(tensors_fn=_drop("model.layers.1.self_attn.k_proj.b_in")),
                       r"model\.layers\.1\.self_attn\.k_proj\.b_in: never loaded"),
    "wrong-shape": (dict(tensors_fn=_replace("model.layers.0.self_attn.v_proj.weight_values", lambda v: v[:, :-4])),
                    r"model\.layers\.0\.self_attn\.v_proj\.weight_values: checkpoint tensor .*\[128, 124\]"),
    "not-2:4": (dict(tensors_fn=_replace("model.layers.1.mlp.up_proj.weight_bitmask", _break_24)),
                r"model\.layers\.1\.mlp\.up_proj\.weight_bitmask.*row 0, columns 0\.\.3 keep 4"),
    "format-version-3": (dict(config_fn=_format_version_3), r"format_version=3"),
    "quantization-config-removed": (dict(config_fn=_drop("quantization_config")),
                                    r"config\.json has no quantization_config.*removed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_fails_at_load_naming_the_tensor(case, tmp_path, tiny):
    edits, message = BAD[case]
    bad = tiny_models.edit_checkpoint(tiny().armor, tmp_path / "bad", **edits)
    with pytest.raises(Exception, match=message):
        run_greedy(bad, quantization="armor", **EAGER)


def test_w8a16_checkpoint_without_a_scale_fails_naming_it(tmp_path, tiny):
    bad = tiny_models.edit_checkpoint(tiny("qwen2", scheme="W8A16").armor, tmp_path / "bad",
                                      tensors_fn=_drop("model.layers.1.mlp.down_proj.weight_scale"))
    with pytest.raises(Exception, match=r"model\.layers\.1\.mlp\.down_proj\.weight_scale: never loaded"):
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
