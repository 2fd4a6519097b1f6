"""Kernel-level tests of the vLLM plugin on small random tensors (no engine started)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from armor_vllm import format as fmt
from armor_vllm import kernels
from armor_vllm.kernels import fold, sandwich, semi_structured, sparse_cpu
from tests import tiny_models
from tests.tiny_models import random_layer

B, K, SHARDS = tiny_models.B, tiny_models.K, tiny_models.SHARDS


def reference(x, values, bitmask, b_in, b_out):
    """x Wᵀ with W from format.reconstruct, one shard at a time (the format's own definition)."""
    ys, off = [], 0
    for i, n in enumerate(SHARDS):
        rows, blocks = slice(off, off + n), slice(off // B, (off + n) // B)
        w = fmt.reconstruct(values[rows], bitmask[rows],
                            None if b_in is None else b_in[min(i, len(b_in) - 1)],
                            None if b_out is None else b_out[blocks])
        ys.append(x @ w.T)
        off += n
    return torch.cat(ys, -1)


@pytest.mark.parametrize("n_slots,blocks", [(1, True), (3, True), (1, False)],
                         ids=["shared-b_in", "per-shard-b_in", "no-blocks"])
def test_fold_equals_sandwich_equals_reconstruct(n_slots, blocks):
    s, values, bitmask, b_in, b_out = random_layer(n_slots, blocks)
    x = torch.randn(5, K)
    bias = torch.randn(sum(SHARDS))
    ref = reference(x, values, bitmask, b_in, b_out) + bias
    folded = torch.nn.functional.linear(x, fold.fold_weight(s, b_in, b_out, SHARDS), bias)
    torch.testing.assert_close(folded, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sandwich.sandwich_linear(x, s, b_in, b_out, bias, SHARDS), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.ops.armor.sandwich(x, s, b_in, b_out, bias, SHARDS), ref, rtol=1e-5, atol=1e-5)


def test_block_apply_is_blockdiag_matmul():
    blocks = torch.randn(K // B, B, B)
    x = torch.randn(3, 2, K)
    dense = torch.block_diag(*blocks)
    torch.testing.assert_close(sandwich.block_apply(x, blocks), x @ dense.T)


def test_sandwich_op_under_fullgraph_compile():
    s, _, _, b_in, b_out = random_layer(3)
    eager = lambda x: torch.ops.armor.sandwich(x, s, b_in, b_out, None, SHARDS)  # noqa: E731
    compiled = torch.compile(eager, fullgraph=True, dynamic=True)
    for t in (1, 7):  # two token counts through one dynamic-shape graph
        x = torch.randn(t, K)
        torch.testing.assert_close(compiled(x), eager(x))


def test_backend_selection_on_cpu():
    cpu = torch.device("cpu")
    on_cpu = "sparse_cpu" if sparse_cpu.unavailable(cpu, torch.bfloat16) is None else "fold"
    assert kernels.select("auto", cpu, torch.bfloat16)[0] == on_cpu
    assert kernels.select("sandwich", cpu, torch.float32) == ("sandwich", "ARMOR_VLLM_BACKEND=sandwich")
    with pytest.raises(ValueError, match="expected one of"):
        kernels.select("dense", cpu, torch.float32)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        kernels.select("semi_structured", cpu, torch.float16)


def test_format_and_kernels_import_without_vllm_or_transformers():
    code = ("import sys\n"
            "for m in ('vllm', 'transformers', 'compressed_tensors'): sys.modules[m] = None  # importing one fails\n"
            "import armor_vllm, armor_vllm.format, armor_vllm.kernels, torch\n"
            "assert torch.ops.armor.sandwich")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_divisibility_error_names_layer():
    pytest.importorskip("vllm")
    from armor_vllm.linear_method import ArmorLinearMethod

    method = ArmorLinearMethod(SimpleNamespace(qcfg=fmt.ArmorQuantizationConfig(block_size=64)))
    layer = SimpleNamespace(prefix="model.layers.3.self_attn.qkv_proj", tp_size=4)
    with pytest.raises(ValueError, match=r"model\.layers\.3\.self_attn\.qkv_proj.*output partition 32 % block_size 64"):
        method._check_divisible(layer, 256, [256, 32, 32])


def _sm80_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.parametrize("n_slots", [1, 3])
def test_semi_structured_matches_dense_on_cuda(n_slots):
    if not _sm80_cuda():
        pytest.skip("needs a CUDA GPU with compute capability >= 8.0 (2:4 sparse tensor cores)")
    shards, k = [128, 64, 64], 256  # CUTLASS needs rows % 32 and K % 64, cuSPARSELt 16 and 16
    s, _, _, b_in, b_out = random_layer(n_slots, shards=shards, k=k, dtype=torch.float16, device="cuda")
    assert semi_structured.misfit(s, shards, n_slots > 1) is None
    layer = torch.nn.Module()
    apply = semi_structured.prepare(layer, s, b_in, b_out, shards)
    x = torch.randn(5, k, device="cuda", dtype=torch.float16)
    bias = torch.randn(sum(shards), device="cuda", dtype=torch.float16)
    torch.testing.assert_close(apply(layer, x, bias), sandwich.sandwich_linear(x, s, b_in, b_out, bias, shards),
                               rtol=2e-2, atol=2e-2)


def test_semi_structured_misfit_reason():
    s = torch.zeros(24, 64, dtype=torch.float16)  # 24 rows: no backend's multiple
    assert "rows %" in semi_structured.misfit(s, [24], per_shard=False)


@pytest.mark.parametrize("cc,cusparselt,dtype,reason", [
    ((8, 0), False, torch.bfloat16, None), ((8, 9), True, torch.float16, None), ((9, 0), True, torch.bfloat16, None),
    ((9, 0), False, torch.bfloat16, "sm90 without cuSPARSELt"), ((8, 0), True, torch.float32, "need fp16/bf16")])
def test_auto_picks_cuda_2_4_only_where_pytorch_has_a_kernel(monkeypatch, cc, cusparselt, dtype, reason):
    monkeypatch.setattr(semi_structured, "available", lambda device: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)
    got = semi_structured.unsupported(torch.device("cuda"), dtype)
    assert got is None if reason is None else reason in got
    assert kernels.select("auto", torch.device("cuda"), dtype)[0] == ("semi_structured" if reason is None else "fold")


def test_self_check_accepts_the_sandwich_and_rejects_wrong_or_failing_kernels():
    from armor_vllm.kernels.selfcheck import self_check

    s, _, _, b_in, b_out = random_layer(3)
    layer = torch.nn.Module()
    good = sandwich.prepare(layer, s, b_in, b_out, SHARDS)
    assert self_check(good, layer, s, b_in, b_out, SHARDS) is None
    assert "off by" in self_check(lambda lyr, x, bias: good(lyr, x, bias) * 1.01, layer, s, b_in, b_out, SHARDS)

    def crash(lyr, x, bias):
        raise RuntimeError("CUTLASS kernel not available for sm90")

    assert "RuntimeError: CUTLASS" in self_check(crash, layer, s, b_in, b_out, SHARDS)


def test_auto_falls_back_to_fold_when_the_cuda_kernel_fails_its_self_check(monkeypatch):
    """The first layer probes the candidate; a failure means fold for it and every later layer."""
    from armor_vllm.kernels import choose

    broken = SimpleNamespace(prepare=lambda layer, s, b_in, b_out, widths: (
        layer.register_parameter("s_packed0", torch.nn.Parameter(s.clone(), requires_grad=False))
        or (lambda lyr, x, bias: torch.zeros(*x.shape[:-1], s.shape[0]))))
    monkeypatch.setitem(kernels.BACKENDS, "semi_structured", broken)
    monkeypatch.setattr(kernels, "select", lambda requested, device, dtype: ("semi_structured", "auto: test"))
    monkeypatch.setattr(semi_structured, "misfit", lambda *a: None)
    monkeypatch.setattr(choose, "_self_check_failures", {})
    s, values, bitmask, b_in, b_out = random_layer(3)
    x = torch.randn(3, K)
    folds = []

    def fold(layer, s, b_in, b_out, widths):  # what the plugin and the transformers module pass
        folds.append(layer.prefix)
        w = kernels.fold.fold_weight(s, b_in, b_out, widths)
        return lambda lyr, x, bias: torch.nn.functional.linear(x, w, bias)

    for i in range(2):
        layer = torch.nn.Module()
        layer.prefix = f"model.layers.{i}.self_attn.qkv_proj"
        apply = choose.prepare_layer(layer, values, bitmask, b_in, b_out, SHARDS, fold)
        torch.testing.assert_close(apply(layer, x, None), reference(x, values, bitmask, b_in, b_out), rtol=1e-5, atol=1e-5)
        assert not hasattr(layer, "s_packed0")  # the candidate's tensors are not kept beside the fold
    assert "off by" in choose._self_check_failures["semi_structured"] and len(folds) == 2


def test_one_dtype_cast_warning_per_dtype_pair(caplog, monkeypatch):
    """vLLM warns per tensor when the checkpoint dtype differs (242 lines for an fp32 model in bf16)."""
    import logging

    from armor_vllm import vllm_logging

    log = logging.getLogger(vllm_logging.CAST_LOGGER)
    # a fresh filter: an engine test earlier in this process (bf16 from an fp32 checkpoint) has used up its first line
    monkeypatch.setattr(log, "filters", [f for f in log.filters if not isinstance(f, vllm_logging.OneCastWarningPerDtype)])
    vllm_logging.install()
    vllm_logging.install()  # idempotent: register() runs in every process, maybe more than once
    assert sum(isinstance(f, vllm_logging.OneCastWarningPerDtype) for f in log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=vllm_logging.CAST_LOGGER):
        for name in ("a.weight_values", "b.weight_values", "c.b_in"):
            log.warning(vllm_logging.CAST_MESSAGE, name, torch.float32, torch.bfloat16)
        log.warning(vllm_logging.CAST_MESSAGE, "d.weight", torch.float16, torch.bfloat16)
        log.warning("something else %s", 1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and "further torch.float32 -> torch.bfloat16 casts are not logged" in lines[0]
    assert "--dtype float32" in lines[0] and "d.weight" in lines[1] and lines[2] == "something else 1"


def test_error_file_is_private_and_never_written_through_a_symlink(tmp_path, monkeypatch):
    """The engine processes' error file: a fresh 0700 directory, the file 0600 (even under umask 0), created
    with O_EXCL; a symlink planted at the old predictable name or in the file's place is not followed."""
    import os
    import stat
    import tempfile

    from armor_vllm import load_errors

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    victim = tmp_path / "victim.txt"
    victim.write_text("")
    planted = tmp_path / f"armor-vllm-errors-{os.getpid()}.txt"  # the name the plugin used to write to
    planted.symlink_to(victim)
    old_umask = os.umask(0)
    try:
        path, other = load_errors.create_error_file(), load_errors.create_error_file()
    finally:
        os.umask(old_umask)
    assert path.parent.parent == tmp_path and path.parent != other.parent  # a new unpredictable directory each time
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.is_file() and not path.is_symlink() and path.read_text() == ""

    monkeypatch.setenv(load_errors.ENV_VAR, str(path))
    load_errors.report(ValueError("model.layers.0.q_proj.b_in:\n  never loaded"))
    assert path.read_text() == "model.layers.0.q_proj.b_in: never loaded\n"
    path.unlink()
    path.symlink_to(victim)
    load_errors.report(ValueError("through a symlink"))
    path.unlink()
    load_errors.report(ValueError("into a removed file"))
    assert victim.read_text() == "" and not path.exists() and planted.is_symlink()
