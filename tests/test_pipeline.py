"""The layer-by-layer schedule: activations spilled to disk, sequential calibration, resumable output shards;
what the published checkpoint holds beside its weights, the tensor-parallel sizes it loads with; a --workers
pool that does not outlive a killed converter."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from armor_vllm import format as fmt
from converters.conversion import driver
from converters.conversion.activations import Activations
from converters.conversion.checks import tensor_parallel_refusals
from converters.conversion.driver import convert
from converters.conversion.report import REPORT_FILE
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


def test_output_holds_what_a_checkpoint_needs_and_the_tensor_parallel_sizes(tmp_path, calib_file, capsys):  # noqa: F811
    """Of the source directory's other files, the tokenizer, generation config, chat template and license come
    along; stray weights never do. The tiny model (4 heads, 2 KV heads of 64) with b = 128: vLLM alone would load
    tp 1, 2 and 4, but at tp 2 each rank gets one 64-row KV head, not a whole 128-row B_out block."""
    src = tiny_dense(tmp_path)
    strays = ["pytorch_model.bin", "model.pth", "optimizer.pt", "model.gguf", "training_args.bin"]
    for name in strays:
        (src / name).write_bytes(b"weights of some other format")
    (src / "LICENSE").write_text("Apache-2.0")
    (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    out = convert(cfg(src, tmp_path / "out", calib_file, opts={"block_size": 128, "iters": 1}, layers=[0]))
    assert sorted(os.listdir(out)) == sorted([
        "LICENSE", "chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "config.json", fmt.INDEX_FILE, *(f"model-{i:05d}-of-00004.safetensors" for i in range(1, 5)),
        REPORT_FILE, "loss_curve.png"])
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["tensor_parallel_sizes"] == [1]
    assert "self_attn.k_proj: output partition 64 % block_size 128" in report["tensor_parallel_refused"]["2"]
    assert "num_attention_heads 4 is not a multiple of 8" in report["tensor_parallel_refused"]["8"]
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("vLLM loads this checkpoint with --tensor-parallel-size 1 (of 1-8); not 2: "), last


def _llama_shapes(hidden: int, inter: int, heads: int, kv: int, head_dim: int) -> dict[str, tuple[int, int]]:
    q, k = heads * head_dim, kv * head_dim
    return {f"model.layers.0.{n}": s for n, s in {
        "self_attn.q_proj": (q, hidden), "self_attn.k_proj": (k, hidden), "self_attn.v_proj": (k, hidden),
        "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter)}.items()}


# (model, config, block size, the tensor-parallel sizes up to 8 that load), worked out by hand from vLLM's rules
TP_CASES = [
    ("SmolLM2-135M", dict(hidden=576, inter=1536, heads=9, kv=3, head_dim=64), 64, [1, 3]),
    ("Llama-2-7B", dict(hidden=4096, inter=11008, heads=32, kv=32, head_dim=128), 64, [1, 2, 4]),  # 8: 1376 % 64
    ("Llama-2-7B", dict(hidden=4096, inter=11008, heads=32, kv=32, head_dim=128), None, [1, 2, 4, 8]),
    ("Llama-3-8B", dict(hidden=4096, inter=14336, heads=32, kv=8, head_dim=128), 128, [1, 2, 4, 8]),
    ("Qwen2.5-0.5B", dict(hidden=896, inter=4864, heads=14, kv=2, head_dim=64), 64, [1, 2]),  # 7: 2 KV heads
    ("Qwen2.5-0.5B", dict(hidden=896, inter=4864, heads=14, kv=2, head_dim=64), 128, [1]),  # 2: a 64-row KV head
]


@pytest.mark.parametrize("model,c,block_size,sizes", TP_CASES, ids=[f"{m}-b{b}" for m, _, b, _ in TP_CASES])
def test_tensor_parallel_sizes_follow_vllm_sharding(model, c, block_size, sizes):
    hf_config = dict(num_attention_heads=c["heads"], num_key_value_heads=c["kv"], intermediate_size=c["inter"])
    refusals = tensor_parallel_refusals(hf_config, _llama_shapes(**c), block_size)
    assert [tp for tp, why in refusals.items() if why is None] == sizes, refusals


def test_pool_workers_exit_when_the_converter_is_killed():
    """SIGKILL reaches only the converter: its --workers pool must not go on solving as orphans."""
    script = ("import os, time\n"
              "from converters.conversion.executors import PoolExecutor\n"
              "ex = PoolExecutor('cpu', 2)\n"
              "busy = [ex.pool.submit(time.sleep, 600) for _ in range(2)]\n"  # two workers mid-'solve'
              "while len(ex.pool._processes) < 2: time.sleep(0.1)\n"
              "print('ready', flush=True)\n"
              "time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[1])
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = psutil.Process(proc.pid).children()
        assert len(workers) >= 2, workers  # the two workers (and spawn's resource tracker)
    finally:
        proc.kill()
        proc.wait()

    def alive(p):
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 15
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    orphans = [p for p in workers if alive(p)]
    for p in orphans:
        p.kill()
    assert not orphans, "workers outlived the killed converter"
