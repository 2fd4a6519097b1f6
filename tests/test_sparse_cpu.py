"""The 2:4 CPU kernel (``armor_vllm/csrc``, backend ``sparse_cpu``) against the sandwich and the dense W_eff.

Every ISA level this CPU runs is tested (the test ids name it); the others are skipped with the
reason, which ``pytest -rs`` prints. Each token count runs both the decode kernel and the
decompress-then-GEMM prefill path.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from armor_vllm.kernels import cpu_isa, fold, sparse_cpu
from tests.tiny_models import B, near_identity, random_24_mask, random_layer
from tests.vllm_helpers import (
    EAGER,
    armor_layer_params,
    assert_same_generation,
    engine,
    greedy,
    run_greedy,
    run_in_subprocess,
)

TOKENS = [1, 2, 3, 4, 7, 8, 16, 33, 300]  # bf16 from 8 tokens: the wide kernel
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}  # relative, Frobenius norm
LAYOUTS = {  # random_layer arguments; K % 32 != 0 exercises the kernels' partial chunk
    "shared-b_in": dict(n_slots=1, blocks=True, shards=[32, 16, 16], k=64),
    "per-shard-b_in": dict(n_slots=3, blocks=True, shards=[32, 16, 16], k=40),
    "b32": dict(n_slots=1, blocks=True, shards=[64], k=96, b=32),  # full 16-row groups of the block kernel
    "b6": dict(n_slots=1, blocks=True, shards=[36], k=48, b=6),  # 3 pairs: the 5-8-token block kernel's lone last pair
    "odd-b": dict(n_slots=1, blocks=True, shards=[21], k=48, b=3),  # masked dot products, then the loop and bmm
    "core-only-odd-N": dict(n_slots=1, blocks=False, shards=[37], k=88),
    "core-only-K48": dict(n_slots=1, blocks=False, shards=[19], k=48),
}


def skip_reason(level: str) -> str | None:
    missing = set(cpu_isa.LEVELS[level]["cpu_flags"]) - cpu_isa.cpu_flags()
    if missing:
        return f"{level}: this CPU lacks {sorted(missing)}"
    if level not in sparse_cpu.loaded_levels():
        return f"{level}: extension not built (see the install log)"
    return None


LEVELS = [pytest.param(lvl, marks=pytest.mark.skipif(skip_reason(lvl) is not None, reason=str(skip_reason(lvl))))
          for lvl in cpu_isa.LEVELS]
DTYPES = pytest.mark.parametrize("dtype", list(TOL), ids=lambda d: str(d).removeprefix("torch."))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def cast(t, dtype):
    return None if t is None else t.to(dtype)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@DTYPES
@pytest.mark.parametrize("level", LEVELS)
def test_kernel_matches_sandwich_and_dense(level, dtype, layout):
    spec = LAYOUTS[layout]
    shards, k = spec["shards"], spec["k"]
    s, _, _, b_in, b_out = random_layer(spec["n_slots"], spec["blocks"], shards=shards, k=k, dtype=torch.float64,
                                        b=spec.get("b", B))
    bias = torch.randn(sum(shards), dtype=torch.float64)
    w_eff = fold.fold_weight(s, b_in, b_out, shards).double()
    values, bitmask = sparse_cpu.compress(s.to(dtype))
    op = getattr(torch.ops, f"armor_{level}").linear
    args = [cast(t, dtype) for t in (b_in, b_out, bias)]
    tol = TOL[dtype]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the op's parallel parts on two threads, whatever the machine
    try:
        with torch.inference_mode():  # as vLLM calls it: the op's worker threads must run in it too
            for t in TOKENS:
                x = torch.randn(t, 2 * k).to(dtype)[:, ::2]  # non-contiguous rows
                want = F.linear(x.double(), w_eff, bias)
                sandwich = torch.ops.armor.sandwich(x, s.to(dtype), *args, shards)
                for prefill_min_tokens in (1, 10**9):  # the slab + GEMM path, then the decode kernel
                    y = op(x, values, bitmask, *args, shards, prefill_min_tokens)
                    assert y.dtype == dtype and y.shape == (t, sum(shards))
                    assert rel_err(y, want) < tol, (t, prefill_min_tokens, rel_err(y, want))
                    assert rel_err(y, sandwich) < 2 * tol, (t, prefill_min_tokens, rel_err(y, sandwich))
    finally:
        torch.set_num_threads(threads)


@DTYPES
@pytest.mark.parametrize("level", LEVELS)
def test_prepare_keeps_s_compressed(level, dtype, monkeypatch):
    """The layer holds values + bitmask + B blocks (no dense copy) and applies to [..., K] inputs."""
    monkeypatch.setenv(sparse_cpu.ISA_ENV_VAR, level)
    shards = [32, 16, 16]
    s, _, _, b_in, b_out = random_layer(3, shards=shards, dtype=dtype)
    n, k = s.shape
    layer = torch.nn.Module()
    apply = sparse_cpu.prepare(layer, s, b_in, b_out, shards)
    held = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert held == n * k // 2 * s.element_size() + n * k // 8 + (b_in.numel() + b_out.numel()) * s.element_size()
    x = torch.randn(2, 3, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    want = torch.ops.armor.sandwich(x, s, b_in, b_out, bias, shards)
    assert rel_err(apply(layer, x, bias), want) < 2 * TOL[dtype]


@DTYPES
@pytest.mark.parametrize("level", LEVELS)
def test_checkpoint_layout_passes_straight_through(level, dtype, monkeypatch):
    """The plugin hands the loaded values + bitmask to sparse_cpu as they are: no dense S, no re-pack,
    the layer holds those very tensors (values + bitmask + B blocks, nothing else)."""
    from armor_vllm.kernels import choose

    monkeypatch.setenv(sparse_cpu.ISA_ENV_VAR, level)
    monkeypatch.setenv("ARMOR_VLLM_BACKEND", "sparse_cpu")

    def no_dense_s(*args):
        raise AssertionError("sparse_cpu must not expand S at load")

    monkeypatch.setattr(choose, "unpack_24", no_dense_s)
    monkeypatch.setattr(sparse_cpu, "compress", no_dense_s)
    shards = [32, 16, 16]
    s, values, bitmask, b_in, b_out = random_layer(3, shards=shards, dtype=dtype)
    values = values.to(dtype)
    layer = torch.nn.Module()
    apply = choose.prepare_layer(layer, values, bitmask, b_in, b_out, shards, fold=no_dense_s)
    assert layer.weight_values.data_ptr() == values.data_ptr() and layer.weight_bitmask.data_ptr() == bitmask.data_ptr()
    held = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert held == (values.numel() + b_in.numel() + b_out.numel()) * values.element_size() + bitmask.numel()
    x = torch.randn(2, 3, s.shape[1]).to(dtype)
    want = torch.ops.armor.sandwich(x, s, b_in, b_out, None, shards)
    assert rel_err(apply(layer, x, None), want) < 2 * TOL[dtype]


@pytest.mark.parametrize("level", LEVELS)
def test_fake_kernel_for_compile(level):
    s, _, _, b_in, b_out = random_layer(3)
    values, bitmask = sparse_cpu.compress(s)
    torch.library.opcheck(getattr(torch.ops, f"armor_{level}").linear,
                          (torch.randn(5, s.shape[1]), values, bitmask, b_in, b_out, None, [32, 16, 16], 32),
                          test_utils=("test_schema", "test_faketensor"))


def test_auto_selects_sparse_cpu_where_it_runs():
    from armor_vllm import kernels

    for dtype in sparse_cpu.DTYPES:
        name, why = kernels.select("auto", torch.device("cpu"), dtype)
        assert name == ("sparse_cpu" if sparse_cpu.loaded_levels() else "fold"), why


# ---------------------------------------------------------------- through vLLM
needs_kernel = pytest.mark.skipif(not sparse_cpu.loaded_levels(), reason="no 2:4 CPU kernel on this machine")


@needs_kernel
@pytest.mark.vllm
@pytest.mark.usefixtures("vllm_cache")
def test_engine_fp32_equals_fold(tiny):
    pytest.importorskip("vllm")
    ckpt = tiny().armor
    want = run_greedy(ckpt, {"ARMOR_VLLM_BACKEND": "fold"}, quantization="armor", **EAGER)
    with engine(ckpt, {"ARMOR_VLLM_BACKEND": "sparse_cpu"}, quantization="armor", **EAGER) as llm:
        params = llm.apply_model(armor_layer_params)[0]
        got = greedy(llm)
    assert params and all("weight_values" in p and "weight" not in p for p in params.values()), params
    assert_same_generation(got, want, atol=1e-4)


@needs_kernel
@pytest.mark.vllm
@pytest.mark.usefixtures("vllm_cache")
def test_engine_bf16_compiled(tiny, tmp_path):
    """bf16 through vLLM's default compiled, multiprocess path: Dynamo traces the op via its fake kernel."""
    pytest.importorskip("vllm")
    ckpt = tiny().armor
    want = run_greedy(ckpt, {"ARMOR_VLLM_BACKEND": "fold"}, quantization="armor", dtype="bfloat16", **EAGER)
    got = run_in_subprocess(ckpt, {"ARMOR_VLLM_BACKEND": "sparse_cpu", "VLLM_ENABLE_V1_MULTIPROCESSING": "1",
                                   "VLLM_CACHE_ROOT": str(tmp_path)}, quantization="armor", dtype="bfloat16")
    # bf16 rounds differently per kernel, so a near-tie may flip a random tiny model's argmax:
    # the first token's logprob must agree, and most prompts must generate the same start
    assert [g[0] for g in got["logprobs"]] == pytest.approx([w[0] for w in want["logprobs"]], abs=0.05)
    assert sum(g[:4] == w[:4] for g, w in zip(got["tokens"], want["tokens"])) >= len(want["tokens"]) - 1


# ---------------------------------------------------------------- what the op is handed
def _good(level):
    """A valid operand set: x, values, bitmask, b_in (per shard), b_out, bias, shard_sizes."""
    shards = [32, 16, 16]
    s, _, _, b_in, b_out = random_layer(3, shards=shards)
    values, bitmask = sparse_cpu.compress(s)
    return dict(x=torch.randn(2, s.shape[1]), values=values, bitmask=bitmask, b_in=b_in, b_out=b_out,
                bias=torch.randn(s.shape[0]), shard_sizes=shards)


def _nibble(bits: int):
    """Row 1, columns 16..19 (byte 2's low nibble) keep ``bits`` instead of 2 of 4."""
    def edit(a):
        a["bitmask"] = a["bitmask"].clone()
        a["bitmask"][1, 2] = (a["bitmask"][1, 2] & 0xF0) | bits
    return edit


def _set(name, fn):
    return lambda a: a.__setitem__(name, fn(a[name]))


# case -> (edit of the valid operands, what the message must say). Cases on x and bias exist only per
# call, the bitmask's content only at load, strides only per call (prepare_compressed makes values contiguous).
MALFORMED = {
    "bitmask-3-of-4": (_nibble(0b0111), "bitmask row 1, columns 16..19 keep 3 of 4"),
    "bitmask-1-of-4": (_nibble(0b0100), "bitmask row 1, columns 16..19 keep 1 of 4"),
    "bitmask-int8": (_set("bitmask", lambda t: t.to(torch.int8)), "bitmask is Char"),
    "bitmask-1d": (_set("bitmask", lambda t: t.flatten()), "bitmask is Byte [512]"),
    "values-width": (_set("values", lambda t: t[:, :-1].contiguous()), "values has shape [64, 31]"),
    "values-rows": (_set("values", lambda t: t[:-1]), "values has shape [63, 32]"),
    "values-strided": (_set("values", lambda t: t.t().contiguous().t()), "values must be contiguous"),
    "values-int": (_set("values", lambda t: t.to(torch.int32)), "values is Int"),
    "b_in-dtype": (_set("b_in", lambda t: t.double()), "b_in is Double"),
    "b_in-blocks-short-of-K": (_set("b_in", lambda t: t[:, :-1]), "b_in has shape [3, 7, 8, 8]"),
    "b_in-not-square": (_set("b_in", lambda t: t[..., :-1]), "b_in has shape [3, 8, 8, 7]"),
    "b_in-3d": (_set("b_in", lambda t: t[0]), "b_in has shape [8, 8, 8]"),
    "b_in-slots": (_set("b_in", lambda t: t[:2]), "b_in has 2 slots"),
    "b_out-blocks-short-of-N": (_set("b_out", lambda t: t[:-1]), "b_out has shape [7, 8, 8]"),
    "b_out-dtype": (_set("b_out", lambda t: t.half()), "b_out is Half"),
    "shards-sum": (_set("shard_sizes", lambda s: [32, 16, 8]), "shard_sizes [32, 16, 8] sum to 56, expected N = 64"),
    "shards-nonpositive": (_set("shard_sizes", lambda s: [48, -16, 32]), "shard_sizes [48, -16, 32] holds a width"),
    "x-width": (_set("x", lambda t: t[:, :-8]), "x has shape [2, 56]"),
    "x-dtype": (_set("x", lambda t: t.double()), "x is Double"),
    "x-scalar": (_set("x", lambda t: t[0, 0]), "x has shape []"),
    "bias-shape": (_set("bias", lambda t: t[:-1]), "bias has shape [63]"),
    "bias-dtype": (_set("bias", lambda t: t.half()), "bias is Half"),
}
AT_LOAD = ("values", "bitmask", "b_in", "b_out", "shard_sizes")  # prepare_compressed's order


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("level", LEVELS)
def test_malformed_operand_is_named(level, case, monkeypatch):
    """Each malformed operand raises a message naming it: at load (the bitmask's content only there),
    and on every call for shapes, dtypes and layouts."""
    edit, message = MALFORMED[case]
    a = _good(level)
    edit(a)
    ops_isa = getattr(torch.ops, f"armor_{level}")
    if not case.startswith(("x-", "bias-", "values-strided")):
        monkeypatch.setenv(sparse_cpu.ISA_ENV_VAR, level)
        with pytest.raises(RuntimeError, match=f"armor sparse_cpu: {re.escape(message)}"):
            sparse_cpu.prepare_compressed(torch.nn.Module(), *(a[k] for k in AT_LOAD))
    if "of-4" not in case:
        with pytest.raises(RuntimeError, match=f"armor sparse_cpu: {re.escape(message)}"):
            ops_isa.linear(*(a[k] for k in ("x", *AT_LOAD[:4], "bias", "shard_sizes")), 32)


# ---------------------------------------------------------------- real shapes, independent reference
REAL_TOKENS = [1, 4, 8, 16, 33, 300]  # decode blocks, the wide kernel (bf16 avx512, 8+), 16-token passes, prefill
REAL_SHAPES = {  # name -> (shards, K); b = 128 as in the 7B checkpoints
    "4096-in": ([256], 4096),  # the wide kernel crosses 16 K slices of 256
    "11008-in": ([256], 11008),  # down_proj's width: 43 slices, 86 B_in blocks
    "11008-out-fused": ([5504, 5504], 256),  # gate/up's 11008 outputs as two shards with their own B_in
}
# Three bf16 roundings in the op (u = B_in·x, v = S·u, y = B_out·v), each within 2^-8 of its value, so
# the relative error stays below 3·2^-8 (the B's are well conditioned); fp32 leaves only summation order.
REAL_TOL = {torch.bfloat16: 3 * 2 ** -8, torch.float32: 1e-5}


def dense_w_eff(s, b_in, b_out, shards) -> torch.Tensor:
    """blockdiag(B_out) · S · blockdiag(B_in[shard]) in fp64, block by block in plain torch (not the fold)."""
    b = b_out.shape[-1]
    rows = []
    for i, part in enumerate(s.double().split(shards)):
        blocks = b_in[min(i, len(b_in) - 1)].double()
        rows.append(torch.cat([part[:, j * b:(j + 1) * b] @ blocks[j] for j in range(len(blocks))], 1))
    w = torch.cat(rows)
    return torch.cat([b_out[j].double() @ w[j * b:(j + 1) * b] for j in range(len(b_out))])


@pytest.mark.parametrize("dtype,shape", [(torch.bfloat16, shape) for shape in REAL_SHAPES] + [(torch.float32, "4096-in")],
                         ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("level", LEVELS)
def test_real_shapes_match_dense_reference(level, dtype, shape):
    """bf16 at every real shape (fp32 once: its tight tolerance sees a single misplaced value)."""
    shards, k = REAL_SHAPES[shape]
    n, b = sum(shards), 128
    gen = torch.Generator().manual_seed(1)
    mask = random_24_mask(n, k, gen)  # each group's pair drawn from all six
    s = (torch.randn(n, k, generator=gen) * mask).to(dtype)
    near = lambda nb: near_identity(nb, b, gen, 0.3 / b ** 0.5)  # noqa: E731
    b_in = torch.stack([near(k // b) for _ in shards]).to(dtype)
    b_out = near(n // b).to(dtype)
    values, bitmask = sparse_cpu.compress(s)
    assert len(bitmask.unique()) == 36  # every pair of a byte's two groups: all table offsets
    w_eff = dense_w_eff(s, b_in, b_out, shards)  # from the operands as the op sees them (rounded to dtype)
    ops_isa = getattr(torch.ops, f"armor_{level}")
    ops_isa.check(values, bitmask, b_in, b_out, shards)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            for t in REAL_TOKENS:
                x = torch.randn(t, k, generator=gen).to(dtype)
                want = x.double() @ w_eff.T
                for prefill_min_tokens in (1, 10**9):  # the slab + GEMM path, then the decode kernels
                    y = ops_isa.linear(x, values, bitmask, b_in, b_out, None, shards, prefill_min_tokens)
                    assert rel_err(y, want) < REAL_TOL[dtype], (t, prefill_min_tokens, rel_err(y, want))
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- int8 kept values (W8A16)
INT8_TOKENS = [1, 4, 8, 16, 33, 300]  # gather (AVX2, bf16: 1-2 tokens), expand passes, prefill slabs
INT8_LAYOUTS = {  # (shards, K, b or None for no B's); K % 32 and K % 16 != 0 exercise the partial chunks
    "shared-b_in": ([64, 32], 1024, 32),
    "fused-per-shard-b_in": ([32, 16, 16], 40, 8),
    "no-b": ([37], 88, None),
}
# bf16: u = B_in·x, S·u and B_out·v each rounded to bf16 (the slab path also rounds the dequantized S)
INT8_TOL = {torch.bfloat16: 4 * 2 ** -8, torch.float32: 1e-5}


def int8_layer(shards, k, b, dtype, per_shard: bool, gen):
    """(int8 codes [N, K] at a random 2:4 mask, scale float32 [N], b_in, b_out in dtype or None)."""
    n = sum(shards)
    codes = (torch.randint(-127, 128, (n, k), generator=gen) * random_24_mask(n, k, gen)).to(torch.int8)
    scale = torch.rand(n, generator=gen) / 64 + 2 ** -10
    if b is None:
        return codes, scale, None, None
    near = lambda nb: near_identity(nb, b, gen, 0.3 / b ** 0.5)  # noqa: E731
    b_in = torch.stack([near(k // b) for _ in (shards if per_shard else [0])]).to(dtype)
    return codes, scale, b_in, near(n // b).to(dtype)


@pytest.mark.parametrize("layout", list(INT8_LAYOUTS))
@pytest.mark.parametrize("dtype", list(INT8_TOL), ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("level", LEVELS)
def test_int8_values_match_dense_reference(level, dtype, layout):
    """y = B_out · (diag(scale) · S_int) · B_in · x in x's dtype, against plain torch in fp64 (dequantize,
    block-diagonal products, matmul), decode kernels and prefill slabs alike."""
    shards, k, b = INT8_LAYOUTS[layout]
    gen = torch.Generator().manual_seed(2)
    codes, scale, b_in, b_out = int8_layer(shards, k, b, dtype, layout.startswith("fused"), gen)
    values, bitmask = sparse_cpu.compress(codes)
    assert values.dtype == torch.int8
    s = codes.double() * scale.double()[:, None]
    w_eff = s if b is None else dense_w_eff(s, b_in, b_out, shards)
    ops_isa = getattr(torch.ops, f"armor_{level}")
    ops_isa.check(values, bitmask, b_in, b_out, shards, scale)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            for t in INT8_TOKENS:
                x = torch.randn(t, k, generator=gen).to(dtype)
                want = x.double() @ w_eff.T
                for prefill_min_tokens in (1, 10**9):  # the slab + GEMM path, then the decode kernels
                    y = ops_isa.linear(x, values, bitmask, b_in, b_out, None, shards, prefill_min_tokens, scale)
                    assert y.dtype == dtype and y.shape == (t, sum(shards))
                    assert rel_err(y, want) < INT8_TOL[dtype], (t, prefill_min_tokens, rel_err(y, want))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("level", LEVELS)
def test_prepare_keeps_int8_values(level, monkeypatch):
    """The layer holds int8 values, the bitmask, a float32 scale per row and the B's: those bytes and no more."""
    monkeypatch.setenv(sparse_cpu.ISA_ENV_VAR, level)
    shards, k = [32, 16, 16], 64
    codes, scale, b_in, b_out = int8_layer(shards, k, 8, torch.bfloat16, True, torch.Generator().manual_seed(3))
    n = sum(shards)
    layer = torch.nn.Module()
    apply = sparse_cpu.prepare(layer, codes, b_in, b_out, shards, scale)
    params = dict(layer.named_parameters())
    assert params["weight_values"].dtype == torch.int8 and params["weight_values"].nbytes == n * k // 2
    assert params["weight_bitmask"].dtype == torch.uint8 and params["weight_bitmask"].nbytes == n * k // 8
    assert params["weight_scale"].dtype == torch.float32 and params["weight_scale"].shape == (n,)
    assert sum(p.nbytes for p in params.values()) == n * k // 2 + n * k // 8 + 4 * n + (b_in.nbytes + b_out.nbytes)
    x = torch.randn(2, 3, k).to(torch.bfloat16)
    want = x.double() @ dense_w_eff(codes.double() * scale.double()[:, None], b_in, b_out, shards).T
    assert rel_err(apply(layer, x, None), want) < INT8_TOL[torch.bfloat16]


def _good_int8():
    codes, scale, b_in, b_out = int8_layer([32, 16, 16], 64, 8, torch.float32, True, torch.Generator().manual_seed(4))
    values, bitmask = sparse_cpu.compress(codes)
    return dict(x=torch.randn(2, 64), values=values, bitmask=bitmask, b_in=b_in, b_out=b_out, bias=None,
                shard_sizes=[32, 16, 16], scale=scale)


# case -> (edit of valid int8 operands, what the message must say)
MALFORMED_SCALE = {
    "int8-without-scale": (_set("scale", lambda t: None), "scale is missing: int8 values need a float32 scale [64]"),
    "scale-shape": (_set("scale", lambda t: t[:, None]), "scale is Float [64, 1], expected Float [64]"),
    "scale-rows": (_set("scale", lambda t: t[:-1]), "scale is Float [63], expected Float [64]"),
    "scale-dtype": (_set("scale", lambda t: t.bfloat16()), "scale is BFloat16 [64], expected Float [64]"),
    "scale-strided": (_set("scale", lambda t: t.repeat_interleave(2)[::2]), "scale must be contiguous"),
    "scale-with-float-values": (_set("values", lambda t: t.float()), "scale is given for Float values"),
}


@pytest.mark.parametrize("case", list(MALFORMED_SCALE))
@pytest.mark.parametrize("level", LEVELS)
def test_malformed_scale_is_named(level, case, monkeypatch):
    edit, message = MALFORMED_SCALE[case]
    a = _good_int8()
    edit(a)
    monkeypatch.setenv(sparse_cpu.ISA_ENV_VAR, level)
    at_load = [a[k] for k in (*AT_LOAD, "scale")]
    with pytest.raises(RuntimeError, match=f"armor sparse_cpu: {re.escape(message)}"):
        sparse_cpu.prepare_compressed(torch.nn.Module(), *at_load)
    with pytest.raises(RuntimeError, match=f"armor sparse_cpu: {re.escape(message)}"):
        getattr(torch.ops, f"armor_{level}").linear(a["x"], *at_load[:4], a["bias"], a["shard_sizes"], 32, a["scale"])


@pytest.mark.parametrize("level", LEVELS)
def test_int8_x_must_match_the_blocks(level):
    a = _good_int8()
    with pytest.raises(RuntimeError, match=r"armor sparse_cpu: x is BFloat16 on cpu, expected Float \(the B blocks'"):
        getattr(torch.ops, f"armor_{level}").linear(a["x"].bfloat16(), a["values"], a["bitmask"], a["b_in"],
                                                     a["b_out"], None, a["shard_sizes"], 32, a["scale"])


@pytest.mark.parametrize("level", LEVELS)
def test_fake_kernel_for_compile_int8(level):
    a = _good_int8()
    torch.library.opcheck(getattr(torch.ops, f"armor_{level}").linear,
                          (torch.randn(5, 64), a["values"], a["bitmask"], a["b_in"], a["b_out"], None, a["shard_sizes"],
                           32, a["scale"]),
                          test_utils=("test_schema", "test_faketensor"))
