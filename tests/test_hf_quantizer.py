"""transformers' ``from_pretrained`` on ARMOR checkpoints (armor_vllm.hf_quantizer): ArmorLinear
modules with the stored tensors, the logits of W = B_out·S·B_in built independently of our code,
vLLM's greedy text, a save_pretrained round trip, bad checkpoints named at load, edited parameters
validated again, and what happens without ``import armor_vllm``."""
import json
import subprocess
import sys

import pytest
import torch

import armor_vllm  # noqa: F401  (registers quant_method "armor" with transformers)
from armor_vllm import format as fmt
from armor_vllm.hf_quantizer import ArmorLinear
from tests import independent, tiny_models
from tests.vllm_helpers import EAGER, MAX_TOKENS, run_greedy

IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def load(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("variant", [dict(model_type="llama"), dict(model_type="qwen2"),
                                     dict(model_type="llama", block_size=None, method="magnitude"),
                                     dict(model_type="qwen2", scheme="W8A16")],
                         ids=["llama", "qwen2-bias", "no-blocks", "qwen2-w8a16"])
def test_from_pretrained_holds_compressed_tensors_and_matches_dense_twin(variant, tiny):
    ckpt = tiny(**variant)
    model = load(ckpt.armor)
    armor = {nm: m for nm, m in model.named_modules() if isinstance(m, ArmorLinear)}
    assert sorted(armor) == fmt.read_checkpoint(ckpt.armor).layer_prefixes()
    assert type(model.lm_head) is torch.nn.Linear  # ignored: stored dense
    # the module holds exactly what the checkpoint stores, under the stored names
    stored = independent.raw_tensors(ckpt.armor)
    for name, t in model.state_dict().items():
        assert torch.equal(t, stored[name]) and t.dtype == stored[name].dtype, name  # int8 stays int8
    torch.testing.assert_close(logits(model), logits(independent.dense_model(ckpt.armor)), rtol=1e-4, atol=1e-4)  # any CPU backend


def test_registered_name_is_the_formats():
    from armor_vllm import hf_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZER_MAPPING[fmt.QUANT_METHOD] is hf_quantizer.ArmorHfQuantizer


@pytest.mark.parametrize("imports", [
    "import armor_vllm; import transformers.models.llama.modeling_llama",  # from_pretrained's import chain
    "import armor_vllm.format",  # any submodule runs the package's registration
    "import transformers.modeling_utils; import armor_vllm",  # transformers first
])
def test_registered_whatever_the_import_order(imports):
    code = f"{imports}\nfrom transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\nprint('armor' in AUTO_QUANTIZER_MAPPING)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "True", proc.stderr[-3000:]


@pytest.mark.parametrize("scheme", ["none", "W8A16"])
@pytest.mark.parametrize("backend", ["fold", "sandwich"])
def test_each_cpu_backend_matches_the_independent_reference(tiny, monkeypatch, backend, scheme):
    ckpt = tiny("qwen2", scheme=scheme)
    monkeypatch.setenv("ARMOR_VLLM_BACKEND", backend)
    torch.testing.assert_close(logits(load(ckpt.armor)), logits(independent.dense_model(ckpt.armor)), rtol=1e-4, atol=1e-4)


def test_kernel_follows_load_state_dict(tiny):
    """The cached kernel is rebuilt when the stored tensors change (here: another checkpoint's)."""
    model, other = load(tiny("llama").armor), tiny("llama", seed=1).armor
    logits(model)
    model.load_state_dict(load(other).state_dict())
    torch.testing.assert_close(logits(model), logits(independent.dense_model(other)), rtol=1e-4, atol=1e-4)


def test_edited_parameters_are_validated_again_before_the_next_forward(tiny):
    """In place, by a new Parameter, through ``.data =`` or load_state_dict: the next forward checks the layer
    against the format before its kernel runs; forwards with nothing changed reuse the kernel."""
    ckpt = tiny("llama")
    model, want = load(ckpt.armor), logits(independent.dense_model(ckpt.armor))
    up = model.model.layers[1].mlp.up_proj
    logits(model)
    kernel = up._kernel[1]
    logits(model)
    assert up._kernel[1] is kernel  # steady state: nothing re-checked or rebuilt

    good = up.weight_bitmask.detach().clone()
    with torch.no_grad():
        up.weight_bitmask[0, 0] = 0x0F  # columns 0..3 keep all four
    with pytest.raises(fmt.ArmorFormatError, match=r"up_proj\.weight_bitmask'.*row 0, columns 0\.\.3 keep 4"):
        logits(model)
    with torch.no_grad():
        up.weight_bitmask.copy_(good)
    torch.testing.assert_close(logits(model), want, rtol=1e-4, atol=1e-4)

    values = up.weight_values
    up.weight_values = torch.nn.Parameter(values[:, :-4].clone(), requires_grad=False)
    with pytest.raises(fmt.ArmorFormatError, match=r"up_proj\.weight_values': shape \[512, 124\], expected \[512, 128"):
        logits(model)
    up.weight_values = values

    b_in = up.b_in.data
    up.b_in.data = b_in.double()
    with pytest.raises(fmt.ArmorFormatError, match=r"up_proj\.b_in': dtype torch\.float64, expected .*float32"):
        logits(model)
    up.b_in.data = b_in

    state = model.state_dict()
    b_out = "model.layers.0.self_attn.o_proj.b_out"
    state[b_out] = torch.full_like(state[b_out], float("nan"))
    model.load_state_dict(state)
    with pytest.raises(fmt.ArmorFormatError, match=r"o_proj\.b_out': contains NaN"):
        logits(model)


@pytest.mark.vllm
@pytest.mark.usefixtures("vllm_cache")
def test_greedy_text_equals_vllm_serving_the_resaved_checkpoint(tiny, tmp_path):
    """transformers on the checkpoint and vLLM on what transformers' save_pretrained wrote of it."""
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer

    ckpt = tiny("llama")
    tok, model = AutoTokenizer.from_pretrained(ckpt.armor), load(ckpt.armor)
    model.save_pretrained(tmp_path / "resaved")
    tok.save_pretrained(tmp_path / "resaved")
    served = run_greedy(tmp_path / "resaved", quantization="armor", **EAGER)["tokens"]
    for prompt, want in zip(tiny_models.PROMPTS, served):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert out[0, ids.shape[1]:].tolist() == want, prompt


@pytest.mark.parametrize("scheme", ["none", "W8A16"])
def test_save_pretrained_round_trip(tiny, tmp_path, scheme):
    ckpt = tiny("qwen2", scheme=scheme)
    model = load(ckpt.armor)
    model.save_pretrained(tmp_path / "resaved")
    again = fmt.read_checkpoint(tmp_path / "resaved", validate=True)
    assert again.qcfg == fmt.read_checkpoint(ckpt.armor).qcfg
    before, after = independent.raw_tensors(ckpt.armor), independent.raw_tensors(tmp_path / "resaved")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    torch.testing.assert_close(logits(load(tmp_path / "resaved")), logits(model), rtol=0, atol=0)


def _drop(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


def _add_dense_weight(prefix):
    return lambda t: {**t, f"{prefix}.weight": torch.zeros(256, 256)}


def _break_24(t):
    bitmask = t["model.layers.1.mlp.up_proj.weight_bitmask"].clone()
    bitmask[0, 0] = 0x0F  # columns 0..3 keep all four
    return {**t, "model.layers.1.mlp.up_proj.weight_bitmask": bitmask}


def _config_field(name, value):
    return lambda c: {**c, "quantization_config": {**c["quantization_config"], name: value}}


BAD = {
    "missing-b_in": (dict(tensors_fn=_drop("model.layers.1.self_attn.k_proj.b_in")),
                     r"'model\.layers\.1\.self_attn\.k_proj\.b_in': missing"),
    "dense-weight-beside-values": (dict(tensors_fn=_add_dense_weight("model.layers.0.self_attn.o_proj")),
                                   r"'model\.layers\.0\.self_attn\.o_proj\.weight': extra tensor"),
    "wrong-shape": (dict(tensors_fn=lambda t: {**t, "model.layers.0.self_attn.v_proj.weight_values":
                                               t["model.layers.0.self_attn.v_proj.weight_values"][:, :-4]}),
                    r"'model\.layers\.0\.self_attn\.v_proj\.weight_values': shape \[128, 124\]"),
    "not-2:4": (dict(tensors_fn=_break_24), r"up_proj\.weight_bitmask'.*row 0, columns 0\.\.3 keep 4"),
    "unknown-field": (dict(config_fn=_config_field("colour", "red")), r"unknown quantization_config fields \['colour'\]"),
    "int8-values-without-scheme": (dict(tensors_fn=lambda t: {**t, "model.layers.0.mlp.up_proj.weight_values":
                                                              t["model.layers.0.mlp.up_proj.weight_values"].to(torch.int8)}),
                                   r"'model\.layers\.0\.mlp\.up_proj\.weight_values': dtype torch\.int8, expected the model's"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint_fails_at_load_naming_the_tensor(case, tiny, tmp_path):
    edits, message = BAD[case]
    bad = tiny_models.edit_checkpoint(tiny("llama").armor, tmp_path / "bad", **edits)
    with pytest.raises(fmt.ArmorFormatError, match=message):
        load(bad)


WITHOUT_IMPORT = """
import json, sys
from transformers import AutoModelForCausalLM
from transformers.quantizers import AutoQuantizationConfig
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
try:
    AutoQuantizationConfig.from_dict(model.config.quantization_config)  # what lm-eval's --model hf calls
    refused = ""
except ValueError as e:
    refused = str(e)
print("RESULT " + json.dumps({"linear": type(model.model.layers[0].self_attn.q_proj).__name__, "refused": refused}))
"""


def test_without_import_transformers_warns_and_lm_eval_refuses(tiny):
    """Without ``import armor_vllm`` transformers 5 only warns (unknown quant_method, MISSING weights) and
    returns re-initialised linears; lm-eval's HF path refuses. config.json says what to install."""
    ckpt = tiny("llama")
    assert "import armor_vllm" in json.loads((ckpt.armor / "config.json").read_text())["quantization_config"]["requires"]
    proc = subprocess.run([sys.executable, "-c", WITHOUT_IMPORT, str(ckpt.armor)], capture_output=True, text=True,
                          check=True)
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["linear"] == "Linear" and "Unknown quantization type, got armor" in result["refused"]
    assert "Unknown quantization type, got armor" in proc.stderr
    assert "self_attn.q_proj.weight" in proc.stderr and "MISSING" in proc.stderr
