"""The layer-by-layer schedule: activations spilled to disk, sequential calibration, resumable output shards."""
import pytest
import torch

from armor_vllm import format as fmt
from converters import driver
from converters.activations import Activations
from converters.driver import convert
from tests.test_converter import calib_file, cfg  # noqa: F401  (fixture)
from tests.tiny_models import tiny_dense, write_dense_twin


def tensors(out):
    ckpt = fmt.read_checkpoint(out)
    return ckpt.load(list(ckpt.tensor_files))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_in_a_file_read_back_exactly_and_the_file_goes(tmp_path, dtype):
    x = [torch.randn(1, 5, 7).to(dtype) for _ in range(3)]
    ram, disk = Activations(3, (1, 5, 7), dtype), Activations(3, (1, 5, 7), dtype, tmp_path / "a" / "x.bin")
    for i in (2, 0, 1):
        ram[i] = disk[i] = x[i]
    assert all(torch.equal(ram[i], x[i]) and torch.equal(disk[i], x[i]) and disk[i].dtype == dtype for i in range(3))
    disk.close()
    assert not (tmp_path / "a" / "x.bin").exists()


def test_spilled_activations_give_the_same_checkpoint(tmp_path, calib_file):  # noqa: F811
    src = tiny_dense(tmp_path)
    ram = convert(cfg(src, tmp_path / "ram", calib_file, activations="ram"))
    disk = convert(cfg(src, tmp_path / "disk", calib_file, activations="disk"))
    a, b = tensors(ram), tensors(disk)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sequential_statistics_come_from_the_compressed_layers(tmp_path, calib_file):  # noqa: F811
    """Layer 1's input statistics in a sequential run equal a dense pass over the model whose layer 0 is the
    compressed one (q/k/v read the layer's input; the linears after them also see layer 1's own dense weights)."""
    src = tiny_dense(tmp_path)
    seq = convert(cfg(src, tmp_path / "seq", calib_file, calibration="sequential", keep_work=True))
    twin = tmp_path / "twin"
    write_dense_twin(seq, twin)
    convert(cfg(twin, tmp_path / "twin-out", calib_file, calibration="dense", keep_work=True))
    dense = convert(cfg(src, tmp_path / "dense", calib_file, calibration="dense", keep_work=True))
    stats = {d: torch.load(tmp_path / f"{d}.armor-work" / "stats" / "layer_0001.pt")["stats"]
             for d in ("seq", "twin-out", "dense")}
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        s = stats["seq"][name]
        torch.testing.assert_close(s["h"], stats["twin-out"][name]["h"], rtol=1e-4, atol=1e-7)
        assert not torch.allclose(s["h"], stats["dense"][name]["h"], rtol=1e-3), name
    a, b = tensors(seq), tensors(dense)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("model.layers.0."))  # same statistics there
    assert not all(torch.equal(a[k], b[k]) for k in a if k.startswith("model.layers.1."))


def test_shards_of_a_failed_run_are_kept_and_not_written_again(tmp_path, calib_file, monkeypatch):  # noqa: F811
    src = tiny_dense(tmp_path)
    real = driver.publish

    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(driver, "publish", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(cfg(src, tmp_path / "out", calib_file))
    assert not (tmp_path / "out").exists()
    shards = sorted((tmp_path / "out.armor-work" / "output").glob("*.safetensors"))
    assert len(shards) == 4
    stamp = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
    monkeypatch.setattr(driver, "publish", real)
    out = convert(cfg(src, tmp_path / "out", calib_file))
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.safetensors")} == stamp
    assert not (tmp_path / "out.armor-work").exists()
    fresh = tensors(convert(cfg(src, tmp_path / "fresh", calib_file)))
    again = tensors(out)
    assert fresh.keys() == again.keys() and all(torch.equal(fresh[k], again[k]) for k in fresh)
