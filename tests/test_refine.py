"""Refinement (block-wise reconstruction) on tiny random models: it lowers each layer's output error on the
held-back samples as an independent measurement sees it, keeps the 2:4 masks, resumes to the same bytes,
and reuses the solves of a run with other refinement settings."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from converters.conversion import pipeline
from converters.conversion.driver import convert
from converters.conversion.refine import RefineOptions
from converters.data import calibration_samples
from tests import independent
from tests.test_converter import calib_file, cfg  # noqa: F401  (fixture)
from tests.test_pipeline import tensors
from tests.tiny_models import tiny_dense

REFINE = RefineOptions(mode="block", steps=12, lr=1e-2, batch=2, holdout=2)


def held_errors(c, out, holdout: int) -> list[float]:
    """Per decoder layer ‖layer_c(x) − y‖² / ‖y − x‖² over the held-back calibration samples (the last
    ``holdout`` of ``c``'s samples), x and y the dense model's input and output of that layer, layer_c the checkpoint's layer
    rebuilt by tests.independent (refinement with dense inputs judges exactly this)."""
    dense = AutoModelForCausalLM.from_pretrained(c.model_dir, dtype=torch.float32).eval()
    comp = independent.dense_model(out)
    samples = calibration_samples(AutoTokenizer.from_pretrained(c.model_dir), c.calib, c.nsamples, c.seqlen, c.seed)
    err = [0.0] * dense.config.num_hidden_layers
    ref = [0.0] * dense.config.num_hidden_layers
    for s in samples[-holdout:]:
        seen = []
        hooks = [layer.register_forward_hook(lambda m, a, kw, o: seen.append((a, kw, o)), with_kwargs=True)
                 for layer in dense.model.layers]
        with torch.no_grad():
            dense(s[None], use_cache=False)
            for i, (a, kw, o) in enumerate(seen):
                y = o[0] if isinstance(o, tuple) else o
                x = a[0] if a else kw["hidden_states"]
                yc = comp.model.layers[i](*a, **kw)
                yc = yc[0] if isinstance(yc, tuple) else yc
                err[i] += float((yc.double() - y.double()).square().sum())
                ref[i] += float((y.double() - x.double()).square().sum())
        for h in hooks:
            h.remove()
    return [e / r for e, r in zip(err, ref)]


def refined(c, **refine):
    import dataclasses
    return dataclasses.replace(c, refine=dataclasses.replace(REFINE, **refine))


@pytest.mark.parametrize("inputs", ["dense", "mixed", "sequential"])
def test_refinement_lowers_output_error_keeps_masks_and_reuses_the_solves(tmp_path, calib_file, inputs):  # noqa: F811
    src = tiny_dense(tmp_path)
    work = tmp_path / "work"
    plain = cfg(src, tmp_path / "plain", calib_file, work_dir=work, keep_work=True)
    convert(plain)
    solves = {p.name: p.stat().st_mtime_ns for p in (work / "layers").iterdir()}
    ref = refined(cfg(src, tmp_path / "refined", calib_file, work_dir=work, keep_work=True), inputs=inputs)
    convert(ref)
    assert {p.name: p.stat().st_mtime_ns for p in (work / "layers").iterdir()} == solves, "the solves ran again"
    a, b = tensors(tmp_path / "plain"), tensors(tmp_path / "refined")
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("weight_bitmask") or not k.endswith(("weight_values", "b_in", "b_out")):
            assert torch.equal(a[k], b[k]), f"{k} changed: refinement may tune only values and blocks"
    assert not all(torch.equal(a[k], b[k]) for k in a), "refinement changed nothing"
    report = json.loads((tmp_path / "refined" / "armor_report.json").read_text())
    records = report["refinement"]
    assert [r["layer"] for r in records] == [0, 1] and report["refine"]["inputs"] == inputs
    assert all(r["held_error_end"] <= r["held_error_start"] for r in records), records
    if inputs == "dense":  # the record is what an independent measurement of the checkpoint gives
        before, after = (held_errors(plain, tmp_path / d, REFINE.holdout) for d in ("plain", "refined"))
        for r, b0, b1 in zip(records, before, after):
            assert r["held_error_start"] == pytest.approx(b0, rel=1e-3), (r, b0)
            assert r["held_error_end"] == pytest.approx(b1, rel=1e-3), (r, b1)
        assert sum(after) < 0.9 * sum(before), (before, after)


def test_killed_refinement_resumes_after_the_last_refined_layer_to_the_same_bytes(tmp_path, calib_file,  # noqa: F811
                                                                                   monkeypatch):
    src = tiny_dense(tmp_path)
    full = convert(refined(cfg(src, tmp_path / "full", calib_file)))
    calls = []
    real = pipeline.refine_layer

    def dies_on_layer_1(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed while refining layer 1
        return real(*args, **kw)

    monkeypatch.setattr(pipeline, "refine_layer", dies_on_layer_1)
    c = refined(cfg(src, tmp_path / "killed", calib_file))
    with pytest.raises(KeyboardInterrupt):
        convert(c)
    assert (c.work_dir / "refined" / "layer_0000.pt").is_file()
    monkeypatch.setattr(pipeline, "refine_layer", real)
    calls.clear()
    resumed = convert(c)
    a, b = tensors(full), tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_baselines_tune_kept_values_and_shared_b_in_stays_shared(tmp_path, calib_file):  # noqa: F811
    src = tiny_dense(tmp_path)
    # dense statistics: with sequential ones the refined layer 0 would change layer 1's statistics and masks
    plain = tensors(convert(cfg(src, tmp_path / "plain", calib_file, method="sparsegpt", calibration="dense")))
    ref = tensors(convert(refined(cfg(src, tmp_path / "ref", calib_file, method="sparsegpt", calibration="dense"))))
    assert not any(k.endswith(("b_in", "b_out")) for k in ref)
    assert all(torch.equal(plain[k], ref[k]) for k in plain if k.endswith("weight_bitmask"))
    assert not all(torch.equal(plain[k], ref[k]) for k in plain if k.endswith("weight_values"))
    shared = tensors(convert(refined(cfg(src, tmp_path / "shared", calib_file, shared_input_transform=True))))
    for i in (0, 1):
        p = f"model.layers.{i}."
        q = shared[p + "self_attn.q_proj.b_in"]
        assert torch.equal(q, shared[p + "self_attn.k_proj.b_in"]) and torch.equal(q, shared[p + "self_attn.v_proj.b_in"])
        assert torch.equal(shared[p + "mlp.gate_proj.b_in"], shared[p + "mlp.up_proj.b_in"])


def test_w8a16_refinement_keeps_the_int8_values_and_tunes_their_scales(tmp_path, calib_file):  # noqa: F811
    src = tiny_dense(tmp_path)
    work = tmp_path / "work"
    plain = tensors(convert(cfg(src, tmp_path / "plain", calib_file, scheme="W8A16", work_dir=work, keep_work=True)))
    ref = tensors(convert(refined(cfg(src, tmp_path / "ref", calib_file, scheme="W8A16", work_dir=work))))
    values = [k for k in plain if k.endswith("weight_values")]
    assert values and all(ref[k].dtype == torch.int8 and torch.equal(plain[k], ref[k]) for k in values)
    assert not all(torch.equal(plain[k], ref[k]) for k in plain if k.endswith("weight_scale"))


@pytest.mark.parametrize("argv, mode, holdout", [
    ([], "block", 8),                                        # the default preset refines, 1/8 of 64 held back
    (["--nsamples", "12"], "block", 1),                      # the hold-out follows --nsamples
    (["--refine-holdout", "3"], "block", 3),
    (["--preset", "quick"], "none", 2),
    (["--preset", "default", "--refine", "none"], "none", 8),
])
def test_presets_and_the_holdout_that_scales_with_the_samples(tmp_path, argv, mode, holdout):
    from converters.commands.cli import convert_config

    c = convert_config([str(tmp_path / "src"), str(tmp_path / "out"), *argv])
    assert (c.refine.mode, c.refine.holdout) == (mode, holdout)
