"""The conversion pipeline on tiny random Llama / Qwen2 / Qwen3 models: every method, reload,
shared input transform, resume after SIGKILL, and the errors a user can run into."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from armor_vllm import format as fmt
from converters.conversion.driver import ConvertConfig, convert
from converters.data import calibration_samples
from converters.evaluation.evaluate import load_hf_model
from converters.conversion.methods import make_options
from tests import independent
from tests.tiny_models import CORPUS, resharded, tiny_dense

SEQ = 32


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> str:
    f = tmp_path_factory.mktemp("text") / "calib.txt"
    f.write_text("\n\n".join(CORPUS * 30))
    return str(f)


def cfg(model_dir, out, calib, method="armor", **kw) -> ConvertConfig:
    opts = dict(block_size=32, iters=4) if method == "armor" else {}
    opts.update(kw.pop("opts", {}))
    return ConvertConfig(model_dir=model_dir, out_dir=out, method=method, calib=calib, nsamples=4, seqlen=SEQ,
                         options=make_options(method, **opts), **kw)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def source_h(c: ConvertConfig) -> dict[str, torch.Tensor]:
    """h of every decoder linear, measured on the source model by tests.independent: the dense model's
    inputs, or with sequential calibration layer i's inputs once layers < i hold the checkpoint's W_eff."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(c.model_dir, dtype=torch.float32).eval()
    samples = calibration_samples(AutoTokenizer.from_pretrained(c.model_dir), c.calib, c.nsamples, c.seqlen, c.seed)
    if c.calibration == "dense":
        return independent.input_h(model, samples)
    compressed, h = independent.dense_state_dict(c.out_dir), {}
    for i in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        h.update({n: v for n, v in independent.input_h(model, samples).items() if n.startswith(prefix)})
        model.load_state_dict({n: t for n, t in compressed.items() if n.startswith(prefix)}, strict=False)
    return h


# measured: <= 5e-8 (fp32 checkpoint and h against float64 here); ARMOR's loss bookkeeping broken on purpose
# (the sparse-core step's change left out) was off by 4.5e-3, a swapped write by > 10x
LOSS_RTOL = 1e-4


def assert_checkpoint_matches_source(c: ConvertConfig) -> None:
    """Every compressed linear of the checkpoint against the source model, by plain torch (tests.independent):
    (a) W_eff's proxy loss against its own source weight is the loss the report gives its job (a job of
    several linears, shared input transform, is one problem over their concatenated rows), (b) that weight
    fits W_eff strictly better than any other source weight of its shape in its layer or the same linear of
    a neighbouring layer (a result written under another linear's name fails), and (c) for ARMOR the
    report's start is NoWag-P's loss and the solver went well below it (a solver stuck at its start fails)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small float64 tensors: on 2 busy cores a second thread made this 10x slower
    try:
        check_against_source(c)
    finally:
        torch.set_num_threads(threads)


def check_against_source(c: ConvertConfig) -> None:
    src, raw = independent.raw_tensors(c.model_dir), independent.raw_tensors(c.out_dir)
    w_eff = {n: independent.effective_weight(raw, n) for n in independent.compressed_prefixes(raw)}
    h = source_h(c)
    report = json.loads((c.out_dir / "armor_report.json").read_text())["layers"]
    assert sorted(n for r in report for n in r["names"]) == sorted(w_eff)
    for r in report:
        names = r["names"]
        w = torch.cat([src[f"{n}.weight"] for n in names])
        loss = independent.proxy_loss(w, torch.cat([w_eff[n] for n in names]), h[names[0]])
        final = "loss_quant_end" if c.scheme == "W8A16" else "loss_end"  # what the checkpoint holds
        assert loss == pytest.approx(r[final], rel=LOSS_RTOL), (r["job"], loss, r[final])
        if c.method == "armor":
            start = independent.nowag_p_loss(w, h[names[0]])
            assert r["loss_start"] == pytest.approx(start, rel=LOSS_RTOL), (r["job"], r["loss_start"], start)
            assert loss < 0.8 * start, f"{r['job']}: ARMOR barely moved from NoWag-P ({start:.4f} -> {loss:.4f})"
        for n in names:
            own, i = src[f"{n}.weight"], int(n.split(".")[2])
            others = [m for m in src if m != f"{n}.weight" and src[m].shape == own.shape
                      and (m.startswith(f"model.layers.{i}.") or m in {n.replace(f".{i}.", f".{i + d}.") + ".weight"
                                                                       for d in (-1, 1)})]
            assert others, n  # every linear of the tiny models has a same-shape twin to be confused with
            mine = independent.proxy_loss(own, w_eff[n], h[n])
            theirs = {m: independent.proxy_loss(src[m], w_eff[n], h[n]) for m in others}
            assert mine < min(theirs.values()), f"{n}: W_eff is closer to another source weight: {mine:.4f} vs {theirs}"


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_armor_converts_and_reloads(tmp_path, calib_file, model_type):
    src = tiny_dense(tmp_path, model_type)
    c = cfg(src, tmp_path / "armor", calib_file)
    out = convert(c)
    ckpt = fmt.read_checkpoint(out, validate=True)
    assert ckpt.qcfg.method == "armor" and ckpt.qcfg.block_size == 32
    n_linears = 2 * 7
    assert len(ckpt.layer_prefixes()) == n_linears
    if model_type == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in ckpt.tensor_files
    report = json.loads((out / "armor_report.json").read_text())
    assert len(report["layers"]) == n_linears
    assert_checkpoint_matches_source(c)
    assert (out / "loss_curve.png").is_file() and (out / "tokenizer.json").is_file()
    # transformers reload: same logits as the source model with W replaced by B_out·S·B_in, built by plain
    # torch from the stored tensors (not through armor_vllm.format, which the quantizer reads with)
    model = load_hf_model(out)
    ref = load_hf_model(src)
    ref.load_state_dict(independent.dense_state_dict(out))
    ids = torch.randint(0, 1000, (1, 16))
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-4, atol=1e-4)  # any CPU kernel
    assert not (tmp_path / "armor.armor-work").exists()


@pytest.mark.parametrize("method", ["armor", "sparsegpt"])
def test_w8a16_checkpoint_holds_int8_values_and_what_its_report_says(tmp_path, calib_file, method):
    """--scheme W8A16: int8 kept values and a [N, 1] scale on disk and in memory after a transformers load; W_eff
    rebuilt by plain torch (values times scale) has the reported loss_quant_end, which is not above loss_quant_start
    (ARMOR's blocks re-solved around the rounding); transformers' logits match the plain-torch dense model.
    SparseGPT runs with sequential calibration, which feeds the next layer the dequantized weights."""
    src = tiny_dense(tmp_path)
    c = cfg(src, tmp_path / "q", calib_file, method=method, scheme="W8A16")
    out = convert(c)
    ckpt = fmt.read_checkpoint(out, validate=True)
    assert ckpt.qcfg.scheme == "W8A16" and json.loads((out / "config.json").read_text())["quantization_config"][
        "config_groups"]["group_0"]["weights"]["strategy"] == "channel"
    raw = independent.raw_tensors(out)
    for p in independent.compressed_prefixes(raw):
        n, k = raw[f"{p}.weight_bitmask"].shape[0], raw[f"{p}.weight_bitmask"].shape[1] * 8
        assert raw[f"{p}.weight_values"].dtype == torch.int8 and raw[f"{p}.weight_values"].shape == (n, k // 2)
        assert raw[f"{p}.weight_scale"].dtype == torch.float32 and raw[f"{p}.weight_scale"].shape == (n, 1)
    report = json.loads((out / "armor_report.json").read_text())
    for r in report["layers"]:
        assert r["loss_quant_end"] <= r["loss_quant_start"], r
        if method == "armor":
            assert r["loss_quant_end"] < r["loss_quant_start"], r
    assert report["mean_loss_quant_end"] <= report["mean_loss_quant_start"]
    assert_checkpoint_matches_source(c)
    model = load_hf_model(out)
    values = {n: p for n, p in model.named_parameters() if n.endswith(".weight_values")}
    assert len(values) == 14 and all(p.dtype == torch.int8 and p.nbytes == p.numel() for p in values.values())
    ref = load_hf_model(src)
    ref.load_state_dict(independent.dense_state_dict(out))
    ids = torch.randint(0, 1000, (1, 16))
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_work_dir_of_another_scheme_is_not_reused(tmp_path, calib_file):
    """The scheme is part of the work directory's fingerprint: a bf16 run's solves never end up in an int8 checkpoint."""
    src = tiny_dense(tmp_path)
    convert(cfg(src, tmp_path / "out", calib_file, method="magnitude", layers=[0], keep_work=True))
    with pytest.raises(FileExistsError, match=r"scheme: 'none' -> 'W8A16'"):
        convert(cfg(src, tmp_path / "out", calib_file, method="magnitude", layers=[0], scheme="W8A16", overwrite=True))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "nowag-p"])
def test_baselines_share_pipeline_and_format(tmp_path, calib_file, method):
    src = tiny_dense(tmp_path)
    c = cfg(src, tmp_path / method, calib_file, method=method)
    out = convert(c)
    ckpt = fmt.read_checkpoint(out, validate=True)
    assert ckpt.qcfg.block_size is None and ckpt.qcfg.method == method
    assert_checkpoint_matches_source(c)
    assert not any(n.endswith(".b_in") for n in ckpt.tensor_files)
    assert torch.isfinite(logits(load_hf_model(out), torch.randint(0, 1000, (1, 8)))).all()


def test_shared_input_transform_ties_b_in(tmp_path, calib_file):
    src = tiny_dense(tmp_path)
    c = cfg(src, tmp_path / "shared", calib_file, shared_input_transform=True, layers=[0])
    out = convert(c)
    ckpt = fmt.read_checkpoint(out, validate=True)
    assert ckpt.qcfg.shared_input_transform
    assert_checkpoint_matches_source(c)
    p = "model.layers.0"
    t = ckpt.load([f"{p}.self_attn.{x}_proj.b_in" for x in "qkv"] + [f"{p}.mlp.{x}_proj.b_in" for x in ("gate", "up")])
    assert torch.equal(t[f"{p}.self_attn.q_proj.b_in"], t[f"{p}.self_attn.k_proj.b_in"])
    assert torch.equal(t[f"{p}.self_attn.q_proj.b_in"], t[f"{p}.self_attn.v_proj.b_in"])
    assert torch.equal(t[f"{p}.mlp.gate_proj.b_in"], t[f"{p}.mlp.up_proj.b_in"])
    # only layer 0 was compressed: layer 1's linears stay dense and are listed in ignore
    assert "model.layers.1.mlp.down_proj" in ckpt.qcfg.ignore
    assert "model.layers.1.mlp.down_proj.weight" in ckpt.tensor_files


RESUME_SCRIPT = """
import sys
from converters.conversion.driver import ConvertConfig, convert
from converters.conversion.methods import make_options
src, out, calib = sys.argv[1:4]
convert(ConvertConfig(model_dir=src, out_dir=out, calib=calib, nsamples=4, seqlen=32,
                      options=make_options("armor", block_size=32, iters=30, patience=10**6)))
"""


def test_sigkill_and_resume_gives_same_checkpoint(tmp_path, calib_file):
    src = tiny_dense(tmp_path)
    run = lambda out: subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, str(src), str(out), calib_file],  # noqa: E731
                                       cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert run(tmp_path / "full").wait(600) == 0
    proc = run(tmp_path / "killed")
    layers = tmp_path / "killed.armor-work" / "layers"
    t0 = time.time()
    while len(list(layers.glob("*.pt"))) < 2 and time.time() - t0 < 400 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "conversion finished before it could be killed; raise its iterations"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed").exists()
    assert run(tmp_path / "killed").wait(600) == 0
    a, b = ({k: v for f in sorted((tmp_path / d).glob("*.safetensors")) for k, v in load_file(f).items()}
            for d in ("full", "killed"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_user_errors(tmp_path, calib_file):
    src = tiny_dense(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(cfg(tmp_path / "nope", tmp_path / "o", calib_file))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert(cfg(tmp_path / "empty", tmp_path / "o", calib_file))
    with pytest.raises(ValueError, match=r"--block-size 24 does not divide .*valid block sizes for this model: \[4, 8, 16, 32"):
        convert(cfg(src, tmp_path / "o", calib_file, opts=dict(block_size=24)))
    with pytest.raises(ValueError, match="no nn.Linear layers to compress"):
        convert(cfg(src, tmp_path / "o", calib_file, ignore=["re:.*"]))
    with pytest.raises(ValueError, match="unknown method 'foo'"):
        convert(cfg(src, tmp_path / "o", calib_file, method="foo"))
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert(cfg(src, tmp_path / "exists", calib_file))
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.armor-work").exists()


def test_nan_weights_and_dead_columns(tmp_path, calib_file):
    def poison(m):
        m.model.layers[0].mlp.up_proj.weight.data[3, 5] = float("nan")

    bad = tiny_dense(tmp_path, edit=poison)
    with pytest.raises(FloatingPointError, match="model.layers.0.mlp.up_proj contains NaN"):
        convert(cfg(bad, tmp_path / "o", calib_file))

    def kill_columns(m):  # input columns 0..7 of q/k/v never fire: h_j = 0 there
        m.model.layers[0].input_layernorm.weight.data[:8] = 0.0

    dead = tiny_dense(tmp_path, "qwen2", edit=kill_columns)
    out = convert(cfg(dead, tmp_path / "dead", calib_file, layers=[0]))
    ckpt = fmt.read_checkpoint(out, validate=True)
    assert all(torch.isfinite(t).all() for t in ckpt.layer("model.layers.0.self_attn.q_proj").values() if t.is_floating_point())


def test_cli_on_real_default_model(tmp_path):
    """armor-convert and armor-eval as a user runs them, on two layers of the embedded model."""
    out = tmp_path / "smol"
    env = dict(os.environ, TQDM_DISABLE="1")
    bin_dir = Path(sys.executable).parent
    subprocess.run([bin_dir / "armor-convert", "default", out, "--preset", "quick", "--layers", "0-1",
                    "--nsamples", "4", "--seqlen", "256", "--iters", "5"], check=True, env=env)
    fmt.read_checkpoint(out, validate=True)
    r = subprocess.run([bin_dir / "armor-eval", "ppl", out, "--seqlen", "256", "--max-windows", "2", "--json"],
                       check=True, env=env, capture_output=True, text=True)
    ppl = json.loads(r.stdout.strip().splitlines()[-1])["ppl"]
    assert 2 < ppl < 60, ppl  # two of 30 layers at 2:4: close to the dense model (~12-15 on this text)
    r = subprocess.run([bin_dir / "armor-convert", "default", out], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" not in r.stderr and "--overwrite" in r.stderr


def test_calibration_moves_only_modules_outside_the_decoder_layers(tmp_path):
    """With --device cuda only one decoder layer at a time may sit on the GPU."""
    from transformers import AutoModelForCausalLM

    from converters.conversion.calibration import decoder_layers, outer_modules

    model = AutoModelForCausalLM.from_pretrained(tiny_dense(tmp_path))
    outer = {id(m) for m in outer_modules(model)}
    assert {id(model.model.embed_tokens), id(model.model.norm), id(model.model.rotary_emb)} <= outer
    assert not outer & {id(m) for layer in decoder_layers(model) for m in layer.modules()}


def test_output_has_one_shard_per_decoder_layer_and_the_work_dir_no_dense_core(tmp_path, calib_file):
    src = tiny_dense(tmp_path)
    out = convert(cfg(src, tmp_path / "armor", calib_file, keep_work=True))
    index = json.loads((out / fmt.INDEX_FILE).read_text())["weight_map"]
    assert index["model.embed_tokens.weight"] == "model-00001-of-00004.safetensors"
    assert {index[n] for n in index if n.startswith("model.layers.1.")} == {"model-00003-of-00004.safetensors"}
    assert index["lm_head.weight"] == index["model.norm.weight"] == "model-00004-of-00004.safetensors"
    saved = torch.load(next((tmp_path / "armor.armor-work" / "layers").glob("*.pt")))
    assert set(saved["parts"][0]) == {"values", "bitmask", "scale", "b_in", "b_out"}


def test_sharded_source_converts_like_a_single_file(tmp_path, calib_file):
    """The layer loader reads through model.safetensors.index.json exactly as through one file."""
    src = tiny_dense(tmp_path)
    outs = [convert(cfg(m, tmp_path / f"out-{i}", calib_file, method="wanda"))
            for i, m in enumerate((src, resharded(src, tmp_path / "sharded")))]
    a, b = (fmt.read_checkpoint(o) for o in outs)
    assert a.tensor_files.keys() == b.tensor_files.keys()
    ta, tb = a.load(list(a.tensor_files)), b.load(list(b.tensor_files))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_statistics_with_xtx_serve_a_method_that_needs_only_h(tmp_path, calib_file):
    """SparseGPT's statistics (h and XᵀX) are reused by ARMOR through --stats-dir; not the other way round."""
    src, stats = tiny_dense(tmp_path), tmp_path / "stats"
    convert(cfg(src, tmp_path / "sgpt", calib_file, method="sparsegpt", stats_dir=stats, layers=[0], calibration="dense"))
    stamp = {p.name: p.stat().st_mtime_ns for p in stats.glob("layer_*.pt")}
    convert(cfg(src, tmp_path / "armor", calib_file, stats_dir=stats, layers=[0]))
    assert {p.name: p.stat().st_mtime_ns for p in stats.glob("layer_*.pt")} == stamp  # reused, not recomputed
    h_only = tmp_path / "h-only"
    convert(cfg(src, tmp_path / "armor2", calib_file, stats_dir=h_only, layers=[0]))
    with pytest.raises(FileExistsError, match="xtx: False -> True"):
        convert(cfg(src, tmp_path / "sgpt2", calib_file, method="sparsegpt", stats_dir=h_only, layers=[0],
                    calibration="dense"))
