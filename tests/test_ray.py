"""The converter's Ray executor on a 2-node Ray cluster on this machine (1 CPU each): same checkpoint
as a local ``--workers 2`` run (also when it finishes one), a SIGKILLed worker costs one retried
task, an address nobody listens on is one clear error; and vLLM's own Ray executor serving an
ARMOR checkpoint at TP=2.

One cluster for the module (starting one takes ~8 s). The executor connects to it by address, as
it would to a multi-node cluster, so the code it ships to workers (runtime_env py_modules) is what
they run.
"""
from __future__ import annotations

import os
import pkgutil
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from converters.commands.cli import convert_main  # noqa: E402
from converters.commands.serving import free_port  # noqa: E402
from converters.conversion.driver import ConvertConfig, convert  # noqa: E402
from converters.conversion.executors import PoolExecutor  # noqa: E402
from converters.conversion.jobs import SolveTask, solve  # noqa: E402
from converters.conversion.methods import LayerStats, make_options  # noqa: E402
from converters.conversion.ray_executor import RayExecutor, check_ray_address  # noqa: E402
from converters.conversion.refine import RefineOptions  # noqa: E402
from tests.tiny_models import CORPUS, tiny_dense  # noqa: E402
from tests.vllm_helpers import assert_same_generation, run_in_subprocess  # noqa: E402

SOLVE_TITLE = "ray::solve"  # a Ray worker's process title while it runs converters.conversion.jobs.solve


@pytest.fixture(scope="module")
def cluster():
    # workers at nice 0 (Ray's default is 15), or a busy machine starves them
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False,
                                                      "_system_config": {"worker_niceness": 0}})
    c.add_node(num_cpus=1, num_gpus=0)
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ray-inputs")
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(CORPUS * 30))
    return {"src": tiny_dense(root), "calib": str(calib)}


def cfg(inputs: dict, out: Path, **kw) -> ConvertConfig:
    # ~1 s per solve: long enough for the kill test to catch one running
    return ConvertConfig(model_dir=inputs["src"], out_dir=out, calib=inputs["calib"], nsamples=4, seqlen=32,
                         workers=2, options=make_options("armor", block_size=32, iters=30, patience=10**6), **kw)


@pytest.fixture(scope="module")
def local_run(inputs, tmp_path_factory) -> Path:
    """The reference: the same conversion on a local process pool (--workers 2), its work directory kept."""
    return convert(cfg(inputs, tmp_path_factory.mktemp("local") / "out", keep_work=True))


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


# ---------------------------------------------------------------- the executor alone
def test_solves_on_ray_equal_solves_here(cluster, tmp_path, monkeypatch):
    """bf16 weights through the object store; the same threads give the same bits (int8 kept values too); the code
    is shipped."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=g)
    stats = LayerStats(x.pow(2).mean(0), x.T @ x / 256, 256)
    tasks = [SolveTask(m, make_options(m, **o), [torch.randn(64, 128, generator=g).bfloat16() for _ in range(2)], stats,
                       scheme=scheme)
             for m, o, scheme in (("armor", dict(block_size=32, iters=3), "none"), ("sparsegpt", {}, "none"),
                                  ("armor", dict(block_size=32, iters=3), "W8A16"))]
    monkeypatch.chdir(tmp_path)  # Ray puts the driver's directory first on its workers' sys.path
    with RayExecutor("cpu", 2, cluster.address) as ex:
        assert ex.slots == 2 and ex.threads == max(1, os.cpu_count() // 2)
        got = [f.result(timeout=120) for f in [ex.submit(solve, t) for t in tasks]]
        threads = ex.threads
        # the workers run the copy the executor shipped, as on a node without this checkout
        shipped = ray.get(ray.remote(pkgutil.resolve_name).remote("converters:__file__"))
        assert "runtime_resources" in shipped and not shipped.startswith(str(Path(__file__).parents[1])), shipped
    # the reference: a --workers 2 process pool (fresh processes, as Ray's workers are: this test process
    # carries whatever numerics settings earlier tests in the session left behind)
    with PoolExecutor("cpu", 2) as pool:
        assert pool.threads == threads
        want = [f.result(timeout=300) for f in [pool.submit(solve, t) for t in tasks]]
    for (gp, _), (wp, _) in zip(got, want):
        for a, b in zip(gp, wp):
            assert a.keys() == b.keys()
            for k in a:
                assert (a[k] is None and b[k] is None) or torch.equal(a[k], b[k]), k
    assert not ray.is_initialized()  # it disconnected; the cluster lives on
    assert len(cluster.list_all_nodes()) == 2


def test_gpu_solves_on_a_cluster_without_gpus_are_refused(cluster):
    with pytest.raises(ValueError, match="--device cuda: no node of the Ray cluster has a GPU"):
        RayExecutor("cuda", 2, cluster.address)
    assert not ray.is_initialized()


def test_unanswered_address_fails_in_seconds():
    with socket.create_server(("127.0.0.1", 0)) as not_ray:  # takes connections, never speaks: a TCP check passes
        for addr in (f"127.0.0.1:{free_port()}", f"127.0.0.1:{not_ray.getsockname()[1]}"):
            t0 = time.perf_counter()
            with pytest.raises(ValueError, match=rf"--ray-address {addr}: no Ray cluster answers there"):
                check_ray_address(addr)
            assert time.perf_counter() - t0 < 5
    with pytest.raises(ValueError, match="--ray-address nonsense: .*HOST:PORT"):
        check_ray_address("nonsense")


# ---------------------------------------------------------------- conversions
def test_ray_conversion_equals_local_workers(cluster, inputs, local_run, tmp_path):
    out = convert(cfg(inputs, tmp_path / "out", executor="ray", ray_address=cluster.address))
    assert_same_checkpoint(out, local_run)


def test_ray_resumes_a_local_run(cluster, inputs, local_run, tmp_path):
    """Results land in the work directory whichever executor computed them: Ray finishes what a local run left."""
    work = tmp_path / "work"
    shutil.copytree(local_run.with_name(local_run.name + ".armor-work"), work)
    results = sorted((work / "layers").glob("*.pt"))
    for f in results[::2]:
        f.unlink()
        f.with_suffix(".json").unlink(missing_ok=True)
    out = convert(cfg(inputs, tmp_path / "out", executor="ray", ray_address=cluster.address, work_dir=work))
    assert_same_checkpoint(out, local_run)


def test_refinement_with_solves_on_ray_equals_refinement_here(cluster, inputs, local_run, tmp_path):
    """--refine block with Ray: the solves run on the cluster, each layer is refined here once its solves are in;
    the same bytes as refining the local pool's solves."""
    refine = RefineOptions(mode="block", steps=4, batch=2, holdout=1)
    works = [tmp_path / "work-local", tmp_path / "work-ray"]
    for w in works:
        shutil.copytree(local_run.with_name(local_run.name + ".armor-work"), w)
    for f in sorted((works[1] / "layers").glob("*.pt"))[::2]:  # Ray solves these again, the rest are reused
        f.unlink()
        f.with_suffix(".json").unlink(missing_ok=True)
    here = convert(cfg(inputs, tmp_path / "here", work_dir=works[0], refine=refine))
    out = convert(cfg(inputs, tmp_path / "out", executor="ray", ray_address=cluster.address, work_dir=works[1],
                      refine=refine))
    assert_same_checkpoint(out, here)
    with pytest.raises(AssertionError):
        assert_same_checkpoint(out, local_run)  # refinement changed something


def solve_workers(cluster) -> list[psutil.Process]:
    """Processes of this cluster's nodes that are running a solve right now."""
    found = []
    for node in cluster.list_all_nodes():
        raylet = psutil.Process(node.all_processes[ray._private.ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
        for p in raylet.children(recursive=True):
            try:
                if " ".join(p.cmdline()).startswith(SOLVE_TITLE):
                    found.append(p)
            except psutil.Error:
                pass
    return found


def test_worker_sigkilled_mid_run_is_retried(cluster, inputs, local_run, tmp_path):
    killed: list[int] = []
    stop = threading.Event()

    def killer():
        while not stop.is_set() and not killed:
            for p in solve_workers(cluster)[:1]:
                os.kill(p.pid, signal.SIGKILL)
                killed.append(p.pid)
            time.sleep(0.02)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        out = convert(cfg(inputs, tmp_path / "out", executor="ray", ray_address=cluster.address))
    finally:
        stop.set()
        t.join()
    assert killed, "no solve was seen running; the conversion finished before a worker could be killed"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    assert_same_checkpoint(out, local_run)


def test_cli_unanswered_address_is_one_error_and_writes_nothing(inputs, tmp_path, capsys):
    addr = f"127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as e:
        convert_main([str(inputs["src"]), str(tmp_path / "out"), "--calib", inputs["calib"], "--nsamples", "4",
                      "--seqlen", "32", "--iters", "2", "--block-size", "32", "--executor", "ray", "--ray-address", addr])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and addr in err[-1], err[-5:]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- vLLM's own Ray executor
@pytest.mark.vllm
@pytest.mark.usefixtures("vllm_cache")
def test_vllm_ray_executor_serves_armor_at_tp2(tmp_path, tiny, dense_result):  # noqa: F811
    """Where vLLM serves on Ray (GPU platforms), an ARMOR checkpoint loads and matches its dense twin at TP=2."""
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    if not current_platform.ray_device_key:
        pytest.skip(f"vLLM's {current_platform.device_name} platform has no Ray device key, so its Ray executor "
                    f"refuses to start ('ValueError: current platform {current_platform.device_name} does not "
                    "support ray.', vllm/v1/executor/ray_utils.py initialize_ray_cluster)")
    if current_platform.device_count() < 2:
        pytest.skip(f"TP=2 needs 2 devices, this machine has {current_platform.device_count()}")
    got = run_in_subprocess(tiny().armor, {"VLLM_CACHE_ROOT": str(tmp_path)}, quantization="armor",
                            tensor_parallel_size=2, enforce_eager=True, distributed_executor_backend="ray")
    assert_same_generation(got, dense_result())
