"""Checkpoint format v2: round trip and every validator case (small random layers, no model); int8 kept values
(W8A16) and configs written as format v1."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from armor_vllm import format as fmt
from tests.tiny_models import random_24_mask

B = 8


def random_24(n, k, g):
    return torch.randn(n, k, generator=g) * random_24_mask(n, k, g)


def random_layer(prefix, n, k, g, bias=False, blocks=True):
    s = random_24(n, k, g)
    b_in = torch.randn(k // B, B, B, generator=g) if blocks else None
    b_out = torch.randn(n // B, B, B, generator=g) if blocks else None
    return s, b_in, b_out, (torch.randn(n, generator=g) if bias else None)


def write(tmp_path, layers, qcfg=None, name="ckpt", extra=None):
    tensors = {}
    for prefix, (s, b_in, b_out, bias) in layers.items():
        tensors.update(fmt.layer_tensors(prefix, s, b_in, b_out, bias))
    tensors.update(extra or {"model.embed_tokens.weight": torch.randn(16, 32)})
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "float32"}
    return fmt.write_checkpoint(tmp_path / name, tensors, cfg, qcfg or fmt.ArmorQuantizationConfig(block_size=B))


@pytest.fixture
def ckpt(tmp_path):
    g = torch.Generator().manual_seed(0)
    layers = {"model.layers.0.self_attn.q_proj": random_layer("q", 32, 64, g),
              "model.layers.0.mlp.down_proj": random_layer("d", 64, 32, g, bias=True)}
    return write(tmp_path, layers), layers


def test_round_trip_reconstruction_is_identical(ckpt):
    path, layers = ckpt
    c = fmt.read_checkpoint(path, validate=True)
    assert c.layer_prefixes() == sorted(layers)
    sd = c.dense_state_dict()
    for prefix, (s, b_in, b_out, bias) in layers.items():
        dense_blocks = lambda bl: torch.block_diag(*bl)  # noqa: E731
        want = dense_blocks(b_out) @ s @ dense_blocks(b_in)
        torch.testing.assert_close(sd[f"{prefix}.weight"], want, rtol=1e-5, atol=1e-5)
        assert torch.equal(fmt.unpack_24(*c.load([f"{prefix}.weight_values", f"{prefix}.weight_bitmask"]).values()), s)
        if bias is not None:
            assert torch.equal(sd[f"{prefix}.bias"], bias)
    assert "model.embed_tokens.weight" in sd
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "armor" and q["format_version"] == 2 and q["block_size"] == B
    assert q["format"] == "dense" and q["config_groups"] is None


def test_kept_zero_values_keep_their_mask(tmp_path):
    s = torch.zeros(8, 16)
    s[0, 1] = 3.0  # a group with one nonzero: the mask still keeps exactly 2
    t = fmt.layer_tensors("l", s)
    mask = fmt.unpack_mask(t["l.weight_bitmask"], 16)
    assert (mask.reshape(8, 4, 4).sum(-1) == 2).all() and mask[0, 1]
    assert torch.equal(fmt.unpack_24(t["l.weight_values"], t["l.weight_bitmask"]), s)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 16), (2, 3, 13), (33, 250), (0, 8), (4, 0)])
def test_bit_packing_is_compressed_tensors_bit_for_bit(shape, device):
    """format v1's bitmask is compressed-tensors' (numpy packbits, little-endian); ours packs on the tensor's device."""
    from compressed_tensors.utils.helpers import pack_bitmasks, unpack_bitmasks

    g = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    for density in (0.5, 0.0, 1.0):
        mask = torch.rand(*shape, generator=g) < density
        want = pack_bitmasks(mask)
        got = fmt.pack_bits(mask.to(device))
        assert got.device.type == device and got.dtype == want.dtype == torch.uint8
        assert torch.equal(got.cpu(), want)
        unpacked = fmt.unpack_mask(got, shape[-1])
        assert unpacked.device.type == device
        assert torch.equal(unpacked.cpu(), unpack_bitmasks(want, list(shape)))
        assert torch.equal(unpacked.cpu(), mask)


def test_baseline_checkpoint_without_blocks(tmp_path):
    g = torch.Generator().manual_seed(1)
    path = write(tmp_path, {"l": random_layer("l", 16, 32, g, blocks=False)},
                 fmt.ArmorQuantizationConfig(block_size=None, method="wanda"))
    c = fmt.read_checkpoint(path, validate=True)
    assert set(c.layer("l")) == {"weight_values", "weight_bitmask"}


def mutate(path, name, fn):
    """Rewrite the shard holding `name` with fn(tensors) applied."""
    idx = json.loads((path / fmt.INDEX_FILE).read_text())
    f = path / idx["weight_map"][name]
    t = load_file(f)
    fn(t)
    save_file(t, f)


P = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("case, change, expected", [
    ("not 2:4", lambda t: t[f"{P}.weight_bitmask"].__setitem__((3, 0), 0b00000111), "expected exactly 2 of every 4"),
    ("values shape", lambda t: t.__setitem__(f"{P}.weight_values", t[f"{P}.weight_values"][:, :-1].contiguous()), "weight_values"),
    ("b_in shape", lambda t: t.__setitem__(f"{P}.b_in", t[f"{P}.b_in"][:-1].contiguous()), "b_in"),
    ("dtype", lambda t: t.__setitem__(f"{P}.b_out", t[f"{P}.b_out"].half()), "expected torch.float32"),
    ("nan", lambda t: t[f"{P}.weight_values"].__setitem__((0, 0), float("nan")), "NaN"),
    ("bitmask dtype", lambda t: t.__setitem__(f"{P}.weight_bitmask", t[f"{P}.weight_bitmask"].to(torch.int32)), "uint8"),
])
def test_validator_rejects(ckpt, case, change, expected):
    path, _ = ckpt
    mutate(path, f"{P}.weight_values", change)
    with pytest.raises(fmt.ArmorFormatError, match=expected) as e:
        fmt.read_checkpoint(path, validate=True)
    assert ".safetensors" in str(e.value) and P in str(e.value)


def test_validator_missing_tensor(ckpt):
    path, _ = ckpt
    mutate(path, f"{P}.b_in", lambda t: t.pop(f"{P}.b_in"))
    with pytest.raises(fmt.ArmorFormatError, match=rf"{P}.b_in.*missing"):
        fmt.read_checkpoint(path, validate=True)


def test_validator_missing_tensor_not_in_index(ckpt):
    """A tensor absent from both shard and index is still caught by the per-layer check."""
    path, _ = ckpt
    mutate(path, f"{P}.b_out", lambda t: t.pop(f"{P}.b_out"))
    idx = json.loads((path / fmt.INDEX_FILE).read_text())
    del idx["weight_map"][f"{P}.b_out"]
    (path / fmt.INDEX_FILE).write_text(json.dumps(idx))
    with pytest.raises(fmt.ArmorFormatError, match=rf"{P}.b_out.*missing"):
        fmt.read_checkpoint(path, validate=True)


def test_validator_extra_tensor(ckpt):
    path, _ = ckpt
    mutate(path, f"{P}.b_in", lambda t: t.__setitem__(f"{P}.scales", torch.ones(3)))
    with pytest.raises(fmt.ArmorFormatError, match=rf"{P}.scales.*extra tensor"):
        fmt.read_checkpoint(path, validate=True)


def test_validator_dense_and_compressed(ckpt):
    path, _ = ckpt
    mutate(path, f"{P}.b_in", lambda t: t.__setitem__(f"{P}.weight", torch.ones(32, 64)))
    idx = json.loads((path / fmt.INDEX_FILE).read_text())
    idx["weight_map"][f"{P}.weight"] = idx["weight_map"][f"{P}.b_in"]
    (path / fmt.INDEX_FILE).write_text(json.dumps(idx))
    with pytest.raises(fmt.ArmorFormatError, match="extra tensor"):
        fmt.read_checkpoint(path, validate=True)


def test_validator_block_size_not_dividing(tmp_path):
    g = torch.Generator().manual_seed(2)
    s, *_ = random_layer("l", 24, 32, g)
    t = fmt.layer_tensors("l", s, torch.eye(16).expand(2, 16, 16), torch.eye(16).expand(2, 16, 16)[:1])
    with pytest.raises(fmt.ArmorFormatError, match="block_size 16 does not divide N=24"):
        fmt.validate_layer("l", {k[2:]: v for k, v in t.items()}, fmt.ArmorQuantizationConfig(block_size=16))


def test_validator_k_not_multiple_of_8():
    with pytest.raises(fmt.ArmorFormatError, match="weight_values"):
        fmt.validate_layer("l", {"weight_values": torch.zeros(4, 6), "weight_bitmask": torch.zeros(4, 1, dtype=torch.uint8)},
                           fmt.ArmorQuantizationConfig(block_size=None, method="magnitude"))


@pytest.mark.parametrize("field, value, expected", [
    ("format_version", 3, r"format_version=3, expected one of \(1, 2\)"),
    ("format", "pack-quantized", r"quantization_config.format='pack-quantized': expected 'dense' or 'int-quantized'"),
    ("format", "int-quantized", r"quantization_config.format='int-quantized' with config_groups=null"),
    ("quant_method", "gptq", "expected 'armor'"),
    ("sparsity_structure", "4:8", "expected '2:4'"),
    ("block_size", 6, "multiple of 4"),
    ("method", "foo", "expected one of"),
    ("colour", "red", r"unknown quantization_config fields \['colour'\]"),
])
def test_config_rejects(ckpt, field, value, expected):
    path, _ = ckpt
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"][field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fmt.ArmorFormatError, match=expected):
        fmt.read_checkpoint(path)


def test_config_names_the_package_and_older_configs_read(ckpt):
    """``requires`` tells readers without armor-vllm what to install; configs written before it existed still read."""
    path, _ = ckpt
    cfg = json.loads((path / "config.json").read_text())
    assert "pip install armor-vllm" in cfg["quantization_config"]["requires"]
    del cfg["quantization_config"]["requires"]
    (path / "config.json").write_text(json.dumps(cfg))
    assert fmt.read_checkpoint(path, validate=True).qcfg.requires == fmt.ArmorQuantizationConfig().requires


def test_write_is_atomic(tmp_path):
    """A write that fails midway leaves no directory that looks complete, and no temp dirs."""
    g = torch.Generator().manual_seed(3)
    tensors = fmt.layer_tensors("l", *random_layer("l", 16, 32, g))

    def crash(_dst):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fmt.write_checkpoint(tmp_path / "out", tensors, {"dtype": "float32"}, fmt.ArmorQuantizationConfig(block_size=B), crash)
    assert list(tmp_path.iterdir()) == []
    bad = dict(tensors, **{"l.weight_bitmask": torch.zeros(16, 4, dtype=torch.uint8)})
    with pytest.raises(fmt.ArmorFormatError):
        fmt.write_checkpoint(tmp_path / "out", bad, {"dtype": "float32"}, fmt.ArmorQuantizationConfig(block_size=B))
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_existing_unless_overwrite(tmp_path, ckpt):
    path, _ = ckpt
    g = torch.Generator().manual_seed(4)
    tensors = fmt.layer_tensors("l", *random_layer("l", 16, 32, g))
    with pytest.raises(FileExistsError):
        fmt.write_checkpoint(path, tensors, {"dtype": "float32"}, fmt.ArmorQuantizationConfig(block_size=B))
    fmt.write_checkpoint(path, tensors, {"dtype": "float32"}, fmt.ArmorQuantizationConfig(block_size=B), overwrite=True)
    assert fmt.read_checkpoint(path).layer_prefixes() == ["l"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_sharding_and_helpers(tmp_path):
    g = torch.Generator().manual_seed(5)
    layers = {f"l{i}": random_layer("l", 16, 32, g) for i in range(3)}
    tensors = {}
    for p, (s, bi, bo, bias) in layers.items():
        tensors.update(fmt.layer_tensors(p, s, bi, bo, bias))
    path = fmt.write_checkpoint(tmp_path / "c", tensors, {"dtype": "float32"}, fmt.ArmorQuantizationConfig(block_size=B),
                                max_shard_bytes=2048)
    assert len(list(path.glob("*.safetensors"))) > 1
    assert fmt.read_checkpoint(path, validate=True).layer_prefixes() == ["l0", "l1", "l2"]
    assert fmt.valid_block_sizes([576, 192, 1536]) == [4, 8, 12, 16, 24, 32, 48, 64, 96, 192]
    smollm_layer = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    assert abs(fmt.overhead_ratio(smollm_layer, 64) - 651264 / 3538944) < 1e-9  # 18.4%, the figure


# ---------------------------------------------------------------- int8 kept values (W8A16)
def quantized_layer(n, k, g, blocks=True):
    """(codes int8 [N, K] at 2:4 positions, scale [N], b_in, b_out): a random W8A16 layer."""
    mask = random_24_mask(n, k, g)
    codes = (torch.randint(-127, 128, (n, k), generator=g) * mask).to(torch.int8)
    scale = torch.rand(n, generator=g) * 0.01 + 1e-3
    b_in = torch.randn(k // B, B, B, generator=g) if blocks else None
    b_out = torch.randn(n // B, B, B, generator=g) if blocks else None
    return codes, mask, scale, b_in, b_out


@pytest.fixture
def qckpt(tmp_path):
    g = torch.Generator().manual_seed(6)
    layers = {P: quantized_layer(32, 64, g), "model.layers.0.mlp.down_proj": quantized_layer(64, 32, g)}
    tensors = {"model.embed_tokens.weight": torch.randn(16, 32)}
    for prefix, (codes, mask, scale, b_in, b_out) in layers.items():
        tensors.update(fmt.layer_tensors(prefix, codes, b_in, b_out, mask=mask, dtype=torch.float32, scale=scale))
    path = fmt.write_checkpoint(tmp_path / "q", tensors, {"dtype": "float32"},
                                fmt.ArmorQuantizationConfig.with_scheme("W8A16", block_size=B))
    return path, layers


def test_int8_round_trip(qckpt):
    """int8 values and a [N, 1] weight_scale on disk; W = blockdiag(b_out) · (scale · codes) · blockdiag(b_in)."""
    path, layers = qckpt
    c = fmt.read_checkpoint(path, validate=True)
    assert c.qcfg.scheme == "W8A16" and c.qcfg.format == "int-quantized"
    group = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group == {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                     "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}}
    sd = c.dense_state_dict()
    for prefix, (codes, mask, scale, b_in, b_out) in layers.items():
        t = c.layer(prefix)
        assert t["weight_values"].dtype == torch.int8 and t["weight_values"].nbytes == codes.numel() // 2
        assert t["weight_scale"].shape == (codes.shape[0], 1) and t["weight_scale"].dtype == torch.float32
        want = torch.block_diag(*b_out.double()) @ (scale.double()[:, None] * codes.double()) @ torch.block_diag(*b_in.double())
        torch.testing.assert_close(sd[f"{prefix}.weight"].double(), want, rtol=1e-5, atol=1e-5)


def test_compressed_tensors_reads_our_quantization_args(qckpt):
    """Our config_groups entry is compressed-tensors' QuantizationScheme, channel-wise int8, as its parser sees it."""
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy

    path, _ = qckpt
    group = json.loads((path / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme.model_validate(group)
    w = scheme.weights
    assert (w.num_bits, w.type, w.symmetric, w.strategy, w.dynamic) == (8, "int", True, QuantizationStrategy.CHANNEL, False)
    assert scheme.input_activations is None


def q_cfg_edit(fn):
    def edit(path):
        cfg = json.loads((path / "config.json").read_text())
        fn(cfg["quantization_config"])
        (path / "config.json").write_text(json.dumps(cfg))
    return edit


def _weights(field, value):
    return q_cfg_edit(lambda q: q["config_groups"]["group_0"]["weights"].__setitem__(field, value))


@pytest.mark.parametrize("edit, expected", [
    (_weights("strategy", "group"), r"config_groups.group_0.weights.strategy='group': expected 'channel'"),
    (_weights("num_bits", 4), r"config_groups.group_0.weights.num_bits=4: expected 8"),
    (_weights("symmetric", False), r"config_groups.group_0.weights.symmetric=False: expected True"),
    (_weights("type", "float"), r"config_groups.group_0.weights.type='float': expected 'int'"),
    (_weights("group_size", 128), r"config_groups.group_0.weights: unknown fields \['group_size'\]"),
    (q_cfg_edit(lambda q: q["config_groups"]["group_0"].__setitem__("input_activations", {"num_bits": 8})),
     r"config_groups.group_0.input_activations=.*expected null"),
    (q_cfg_edit(lambda q: q["config_groups"].__setitem__("group_1", q["config_groups"]["group_0"])),
     r"quantization_config.config_groups=.*expected one group"),
    (q_cfg_edit(lambda q: q.__setitem__("format", "dense")), r"quantization_config.format='dense' with config_groups=set"),
    (q_cfg_edit(lambda q: q.__setitem__("format_version", 1)), r"format_version=1 with config_groups"),
])
def test_quantization_config_rejects_what_it_does_not_know(qckpt, edit, expected):
    """Any quantization but W8A16 per channel: one line naming config.json and the field."""
    path, _ = qckpt
    edit(path)
    with pytest.raises(fmt.ArmorFormatError, match=expected) as e:
        fmt.read_checkpoint(path)
    assert "\n" not in str(e.value) and str(e.value).startswith(str(path / "config.json"))


QP = "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("change, expected", [
    (lambda t: t.__setitem__(f"{QP}.weight_scale", t[f"{QP}.weight_scale"].reshape(1, -1).contiguous()),
     r"weight_scale': torch.float32 \[1, 64\], expected a floating \[64, 1\]"),
    (lambda t: t.__setitem__(f"{QP}.weight_scale", t[f"{QP}.weight_scale"].half()), r"weight_scale': dtype torch.float16"),
    (lambda t: t.__setitem__(f"{QP}.weight_values", t[f"{QP}.weight_values"].float()),
     r"weight_values': dtype torch.float32, expected int8"),
    (lambda t: t.pop(f"{QP}.weight_scale"), r"weight_scale': missing .*scheme W8A16"),
])
def test_validator_rejects_int8_layers(qckpt, change, expected):
    path, _ = qckpt
    mutate(path, f"{QP}.weight_values", change)
    if expected.endswith("W8A16"):  # a tensor gone from its shard must leave the index too
        idx = json.loads((path / fmt.INDEX_FILE).read_text())
        del idx["weight_map"][f"{QP}.weight_scale"]
        (path / fmt.INDEX_FILE).write_text(json.dumps(idx))
    with pytest.raises(fmt.ArmorFormatError, match=expected) as e:
        fmt.read_checkpoint(path, validate=True)
    assert ".safetensors" in str(e.value) and QP in str(e.value)


def test_int8_values_need_the_quantization_config(qckpt):
    """int8 values under format 'dense', or a weight_scale in an unquantized checkpoint, are refused by name."""
    qpath, _ = qckpt
    q_cfg_edit(lambda q: (q.__setitem__("format", "dense"), q.__setitem__("config_groups", None)))(qpath)
    with pytest.raises(fmt.ArmorFormatError, match=r"weight_scale': unexpected tensor.*scheme none"):
        fmt.read_checkpoint(qpath, validate=True)
    with pytest.raises(fmt.ArmorFormatError, match=r"weight_values': dtype torch.int8, expected the model's floating"):
        fmt.validate_layer(QP, {k: v for k, v in fmt.read_checkpoint(qpath).layer(QP).items() if k != "weight_scale"},
                           fmt.read_checkpoint(qpath).qcfg)


def test_format_v1_configs_read(ckpt):
    """A checkpoint written as format v1 (no format or config_groups fields) reads and validates as before."""
    path, layers = ckpt
    cfg = json.loads((path / "config.json").read_text())
    q = cfg["quantization_config"]
    for k in ("format", "config_groups"):
        del q[k]
    q["format_version"] = 1
    (path / "config.json").write_text(json.dumps(cfg))
    c = fmt.read_checkpoint(path, validate=True)
    assert c.qcfg.format_version == 1 and c.qcfg.scheme == "none"
    assert fmt.ArmorQuantizationConfig.from_dict(c.qcfg.to_dict()) == c.qcfg  # written back (save_pretrained), read again
