"""Unit tests of the compression methods' math on small random layers (CPU, a few seconds)."""
import itertools
import math

import pytest
import torch

from converters.conversion.methods import METHODS, LayerStats, get_method, make_options
from converters.conversion.methods.armor import AdamStep
from converters.conversion.methods.armor_exact import exact_step, refine_core_values, update_in_blocks, update_out_blocks
from converters.conversion.methods.armor_sparsify import (core_gradient, from_tiles, scaled_residual, solve_groups,
                                               sparse_core_step, to_tiles)
from converters.conversion.methods.masks import block_diag_expand, nowag_normalize, proxy_loss, sanitize_h, two_four_mask
from converters.conversion.methods.nowag import nowag_mask
from converters.conversion.methods.sparsegpt import sparsegpt_2_4
from tests import independent

N, K, BS = 32, 64, 8
ALL = ["magnitude", "wanda", "sparsegpt", "nowag-p", "armor"]


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: extra threads only add synchronisation (seconds on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_layer(seed=0, n=N, k=K):
    """Weight with heavy columns and an exactly-zero group; stats from uneven random inputs."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[:, :3] *= 5
    w[0, 4:8] = 0.0
    x = torch.randn(256, k, generator=g) * (2 * torch.rand(k, generator=g))
    return w, LayerStats(h=(x * x).mean(0), xtx=x.T @ x / 256, ntokens=256)


def random_state(seed=0, bs=BS, n=N, k=K):
    """Non-identity A, Bs, a 2:4 core S with mask M, and a target Wt, in tile layout."""
    g = torch.Generator().manual_seed(seed)
    na, nb = n // bs, k // bs
    a = torch.eye(bs) + 0.3 * torch.randn(na, bs, bs, generator=g)
    bs_ = torch.eye(bs) + 0.3 * torch.randn(nb, bs, bs, generator=g)
    m = to_tiles(two_four_mask(torch.randn(n, k, generator=g)), bs)
    s = torch.randn(na, nb, bs, bs, generator=g) * m
    wt = torch.randn(na, nb, bs, bs, generator=g)
    return a, bs_, s, m, wt


def loss64(a, bs_, s, wt):
    return float(scaled_residual(a.double(), s.double(), bs_.double(), wt.double()).square().sum())


def reconstruct(res):
    if res.b_in is None:
        return res.weight
    return block_diag_expand(res.b_out) @ res.weight @ block_diag_expand(res.b_in)


def assert_two_four(mask_or_weight, exact=False):
    counts = (mask_or_weight != 0).reshape(mask_or_weight.shape[0], -1, 4).sum(-1)
    assert (counts == 2).all() if exact else (counts <= 2).all()


def run(name, w, stats, **opts):
    return get_method(name)(w, stats, make_options(name, **{**({"block_size": BS} if name == "armor" else {}), **opts}))


# --- registry and helpers -------------------------------------------------------------------------

def test_registry_lists_all_methods():
    assert sorted(METHODS) == sorted(ALL)
    assert get_method("armor") is METHODS["armor"].fn and METHODS["sparsegpt"].needs_xtx
    with pytest.raises(ValueError, match="valid methods: armor, magnitude, nowag-p, sparsegpt, wanda"):
        get_method("armour")


def test_two_four_mask_ties_and_nan():
    assert two_four_mask(torch.zeros(3, 8)).equal(torch.tensor([[1, 1, 0, 0] * 2] * 3, dtype=torch.bool))
    scores = torch.tensor([[float("nan"), 1.0, 1.0, 0.5]])
    assert two_four_mask(scores).tolist() == [[False, True, True, False]]
    with pytest.raises(ValueError, match="multiple of 4"):
        two_four_mask(torch.zeros(2, 6))


def test_sanitize_h_and_proxy_loss():
    h = torch.tensor([1.0, 0.0, float("nan"), 3.0, -1.0, float("inf")])
    assert sanitize_h(h).tolist() == [1.0, 2.0, 2.0, 3.0, 2.0, 2.0]
    assert sanitize_h(torch.zeros(4)).tolist() == [1.0] * 4
    w, stats = make_layer()
    wbar, r, c = nowag_normalize(w)
    torch.testing.assert_close(r[:, None] * wbar * c[None, :], w)
    assert proxy_loss(wbar, torch.zeros_like(wbar), stats.h) == pytest.approx(1.0)
    assert proxy_loss(wbar, wbar, stats.h) == 0.0


# --- every method ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,solver", [(m, "exact") for m in ALL] + [("armor", "adam")])
def test_every_method_is_valid_2_4(name, solver):
    w, stats = make_layer()
    res = run(name, w, stats, **(dict(iters=10, solver=solver) if name == "armor" else {}))
    assert res.weight.shape == (N, K) and res.weight.dtype == torch.float32
    assert_two_four(res.weight)
    assert torch.isfinite(res.weight).all() and 0 <= res.loss_end <= res.loss_start <= 1.0
    if name == "armor":
        assert res.b_out.shape == (N // BS, BS, BS) and res.b_in.shape == (K // BS, BS, BS)
        assert res.history[0] == res.loss_start and len(res.history) == res.iters + 1
    # the kept positions of a group of exact zeros are still exactly 2
    wbar, _, _ = nowag_normalize(w)
    assert_two_four(nowag_mask(wbar, stats.h), exact=True)
    assert_two_four(two_four_mask(w.abs()), exact=True)


@pytest.mark.parametrize("name,solver", [(m, "exact") for m in ALL] + [("armor", "adam")])
def test_bad_h_gives_finite_results(name, solver):
    w, stats = make_layer()
    stats.h[:5] = 0.0
    stats.h[5] = float("nan")
    stats.h[6] = float("inf")
    res = run(name, w, stats, **(dict(iters=5, solver=solver) if name == "armor" else {}))
    assert torch.isfinite(res.weight).all() and all(math.isfinite(v) for v in res.history + [res.loss_end])
    if res.b_in is not None:
        assert torch.isfinite(res.b_in).all() and torch.isfinite(res.b_out).all()


def test_baselines_report_normalised_loss():
    w, stats = make_layer()
    for name in ["magnitude", "wanda", "nowag-p"]:
        res = run(name, w, stats)
        assert res.loss_start == res.loss_end == pytest.approx(independent.proxy_loss(w, res.weight, stats.h), rel=1e-5)
        assert res.history == [] and res.b_in is None
    # NoWag-P's mask minimises the normalised loss among masks that keep Wbar's values
    assert run("nowag-p", w, stats).loss_end <= min(run(n, w, stats).loss_end for n in ["magnitude", "wanda"])


# --- sparse-core step -----------------------------------------------------------------------------

def brute_force_group(A, B, W, s, row, g):
    """Best support and values of one group by explicit least squares over the 6 supports (float64)."""
    cols = slice(4 * g, 4 * g + 4)
    s0 = s.clone()
    s0[row, cols] = 0
    r = (A @ s0 @ B - W).flatten()
    best = None
    for p in itertools.combinations(range(4), 2):
        x = torch.stack([torch.outer(A[:, row], B[4 * g + j]).flatten() for j in p], 1)
        sol = torch.linalg.lstsq(x, -r[:, None]).solution[:, 0]
        loss = float((r + x @ sol).square().sum())
        if best is None or loss < best[0]:
            best = (loss, p, sol)
    s0[row, 4 * g + torch.tensor(best[1])] = best[2]
    return s0, [j in best[1] for j in range(4)]


@pytest.mark.parametrize("k", [1, 3])
def test_group_updates_match_brute_force_lstsq(k):
    """k groups per tile, solved in turn: each must equal the explicit least-squares optimum."""
    a, bs_, s, m, wt = random_state(1)
    na, nb = a.shape[0], bs_.shape[0]
    g = torch.Generator().manual_seed(2)
    idx = torch.stack([torch.randperm(BS * BS // 4, generator=g)[:k] for _ in range(na * nb)])
    s1, m1 = s.clone(), m.clone()
    before = loss64(a, bs_, s, wt)
    change = solve_groups(a, bs_, s1, m1, core_gradient(a, scaled_residual(a, s, bs_, wt), bs_), idx)
    assert change == pytest.approx(loss64(a, bs_, s1, wt) - before, rel=1e-4)
    for t in range(na * nb):
        ia, ib = divmod(t, nb)
        A, B, W = a[ia].double(), bs_[ib].double(), wt[ia, ib].double()
        expect, expect_m = s[ia, ib].double(), m[ia, ib].clone()
        for j in range(k):
            row, grp = divmod(int(idx[t, j]), BS // 4)
            expect, keep = brute_force_group(A, B, W, expect, row, grp)
            expect_m[row, 4 * grp:4 * grp + 4] = torch.tensor(keep)
        torch.testing.assert_close(s1[ia, ib].double(), expect, rtol=1e-4, atol=1e-5)
        assert torch.equal(m1[ia, ib], expect_m)


@pytest.mark.parametrize("groups_per_tile", [1, 3, 16])
def test_sparse_step_never_increases_loss(groups_per_tile):
    a, bs_, s, m, wt = random_state(3)
    gen = torch.Generator().manual_seed(0)
    prev = loss64(a, bs_, s, wt)
    for _ in range(10):
        change = sparse_core_step(a, bs_, s, m, core_gradient(a, scaled_residual(a, s, bs_, wt), bs_),
                                  groups_per_tile, gen)
        cur = loss64(a, bs_, s, wt)
        assert change <= 0 and cur <= prev * (1 + 1e-6)
        assert change == pytest.approx(cur - prev, rel=1e-3, abs=1e-6 * prev)
        prev = cur
        assert_two_four(from_tiles(m), exact=True)
        assert (s[~m] == 0).all()


@pytest.mark.parametrize("solver", ["exact", "adam"])
def test_sparse_step_after_each_solver_never_increases_loss(solver):
    a, bs_, s, m, wt = random_state(4)
    step = exact_step if solver == "exact" else AdamStep(a, bs_, s, torch.ones(K // BS, BS), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        a, bs_, e, grad = step(a, bs_, s, m, wt)
        torch.testing.assert_close(e, scaled_residual(a, s, bs_, wt), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grad, core_gradient(a, e, bs_), atol=1e-4, rtol=1e-4)
        before = loss64(a, bs_, s, wt)
        sparse_core_step(a, bs_, s, m, grad, 2, gen)
        assert loss64(a, bs_, s, wt) <= before * (1 + 1e-6)


# --- exact continuous step ------------------------------------------------------------------------

def test_exact_block_updates_each_never_increase_loss():
    a, bs_, s, m, wt = random_state(5)
    for _ in range(3):
        before = loss64(a, bs_, s, wt)
        a = update_out_blocks(a, s, bs_, wt)
        mid = loss64(a, bs_, s, wt)
        bs_, f = update_in_blocks(a, s, bs_, wt)
        after = loss64(a, bs_, s, wt)
        torch.testing.assert_close(f, a[:, None] @ s)
        e = scaled_residual(a, s, bs_, wt)
        grad = core_gradient(a, e, bs_)
        refine_core_values(a, bs_, s, m, e, grad, steps=3)
        last = loss64(a, bs_, s, wt)
        assert mid <= before * (1 + 1e-6) and after <= mid * (1 + 1e-6) and last <= after * (1 + 1e-6)
        assert last < 0.99 * before
        assert (s[~m] == 0).all()
        torch.testing.assert_close(e, scaled_residual(a, s, bs_, wt), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grad, core_gradient(a, e, bs_), atol=1e-4, rtol=1e-4)


def test_exact_updates_reject_steps_the_ridge_would_make_worse():
    a, bs_, s, m, wt = random_state(6)
    a = update_out_blocks(a, s, bs_, wt)          # now (nearly) optimal: a huge ridge can only hurt
    bs_, _ = update_in_blocks(a, s, bs_, wt)
    before = loss64(a, bs_, s, wt)
    a2 = update_out_blocks(a, s, bs_, wt, ridge=1e3)
    assert loss64(a2, bs_, s, wt) <= before * (1 + 1e-6)
    b2, _ = update_in_blocks(a, s, bs_, wt, ridge=1e3)
    assert loss64(a, b2, s, wt) <= before * (1 + 1e-6)
    assert torch.equal(a2, a) and torch.equal(b2, bs_)


def test_exact_loop_history_is_monotone():
    w, stats = make_layer(7)
    res = run("armor", w, stats, iters=30, solver="exact", groups_per_tile=2)
    hist = torch.tensor(res.history, dtype=torch.float64)
    assert (hist[1:] <= hist[:-1] * (1 + 1e-5)).all()
    assert res.loss_end < 0.5 * res.loss_start


# --- lifecycle ------------------------------------------------------------------------------------

def test_keep_best_with_divergent_adam():
    w, stats = make_layer(8)
    res = run("armor", w, stats, iters=15, solver="adam", lr=0.5)
    assert max(res.history) > res.history[0]                  # the large lr does make it worse
    assert res.loss_end <= res.loss_start and res.loss_end == min(res.history)
    assert independent.proxy_loss(w, reconstruct(res), stats.h) == pytest.approx(res.loss_end, rel=1e-4)


@pytest.mark.parametrize("solver", ["exact", "adam"])
def test_fold_reconstructs_the_optimised_matrix(solver):
    w, stats = make_layer(9)
    res = run("armor", w, stats, iters=20, solver=solver, lr=1e-2)
    assert res.loss_end < res.loss_start
    assert independent.proxy_loss(w, reconstruct(res), stats.h) == pytest.approx(res.loss_end, rel=1e-4)


def test_iteration_zero_is_nowag_p():
    w, stats = make_layer(10)
    nowag = run("nowag-p", w, stats)
    res0 = run("armor", w, stats, iters=0)
    assert res0.history == [res0.loss_start] and res0.loss_end == res0.loss_start
    assert res0.loss_start == pytest.approx(nowag.loss_end, rel=1e-5)
    assert res0.loss_start == pytest.approx(independent.nowag_p_loss(w, stats.h), rel=1e-5)
    torch.testing.assert_close(reconstruct(res0), nowag.weight, atol=1e-5, rtol=1e-5)
    assert run("armor", w, stats, iters=3).history[0] == res0.loss_start


def test_early_stopping():
    w, stats = make_layer(11)
    res = run("armor", w, stats, iters=500, rtol=0.5, patience=3)
    assert res.iters < 500 and len(res.history) == res.iters + 1


@pytest.mark.parametrize("solver", ["exact", "adam"])
def test_deterministic_given_seed(solver):
    w, stats = make_layer(12)
    r1, r2 = (run("armor", w, stats, iters=8, solver=solver, seed=3) for _ in range(2))
    assert torch.equal(r1.weight, r2.weight) and torch.equal(r1.b_in, r2.b_in) and r1.history == r2.history
    assert run("armor", w, stats, iters=8, solver=solver, seed=4).history != r1.history


def test_progress_callback_and_bad_config():
    w, stats = make_layer()
    seen = []
    get_method("armor")(w, stats, make_options("armor", block_size=BS, iters=4), lambda it, loss: seen.append((it, loss)))
    assert [it for it, _ in seen] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"b=12 .*N=32 and K=64.*valid b for this layer: \[4, 8, 16, 32\]"):
        run("armor", w, stats, block_size=12)
    for b in (6, 0, -64):
        with pytest.raises(ValueError, match=rf"--block-size {b}: expected a positive integer multiple of 4"):
            run("armor", w, stats, block_size=b)
    for bad, msg in ((dict(solver="sgd"), "--solver sgd"), (dict(iters=-1), "--iters -1"),
                     (dict(groups_per_tile=0), "--groups-per-tile 0"), (dict(lr=0.0), "--lr 0.0")):
        with pytest.raises(ValueError, match=msg):
            run("armor", w, stats, **bad)
    with pytest.raises(ValueError, match="--method wanda does not take --block-size"):
        make_options("wanda", block_size=64)


# --- SparseGPT ------------------------------------------------------------------------------------

def direct_obs_2_4(w, h, dampening):
    """Textbook OBS, column by column, with a full-precision inverse of the remaining columns' H."""
    w, h = w.double().clone(), h.double()
    h = h + dampening * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    out = torch.zeros_like(w)
    for i in range(w.shape[1]):
        hinv = torch.linalg.inv(h[i:, i:])
        if i % 4 == 0:
            sal = torch.stack([w[:, j] ** 2 / torch.linalg.inv(h[j:, j:])[0, 0] for j in range(i, i + 4)], 1)
            keep = torch.zeros_like(sal, dtype=torch.bool).scatter_(1, sal.topk(2, dim=1).indices, True)
        q = w[:, i] * keep[:, i % 4]
        w[:, i:] -= ((w[:, i] - q) / hinv[0, 0])[:, None] * hinv[0][None, :]
        out[:, i] = q
    return out


@pytest.mark.parametrize("blocksize", [4, 8])
def test_sparsegpt_matches_direct_obs(blocksize):
    g = torch.Generator().manual_seed(13)
    w = torch.randn(4, 8, generator=g)
    x = torch.randn(16, 8, generator=g)
    h = x.T @ x / 16 + 0.1 * torch.eye(8)
    out = sparsegpt_2_4(w, h, 0.01, blocksize)
    expect = direct_obs_2_4(w, h, 0.01)
    assert torch.equal(out != 0, expect != 0)
    torch.testing.assert_close(out.double(), expect, atol=1e-4, rtol=1e-4)


def test_sparsegpt_needs_xtx_and_handles_dead_inputs():
    w, stats = make_layer()
    with pytest.raises(ValueError, match="xtx"):
        get_method("sparsegpt")(w, LayerStats(h=stats.h, xtx=None, ntokens=1), make_options("sparsegpt"))
    stats.xtx[:, 9] = 0.0
    stats.xtx[9, :] = 0.0
    res = get_method("sparsegpt")(w, stats, make_options("sparsegpt"))
    assert torch.isfinite(res.weight).all() and (res.weight[:, 9] == 0).all()
    assert_two_four(res.weight)
