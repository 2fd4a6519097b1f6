"""Solves as Ray tasks (``--executor ray``): on a private local Ray instance, or on a cluster that is
already running (``--ray-address``), e.g. the one vLLM serves on with ``--distributed-executor-backend ray``.

Why Ray tasks (docs/scale.md): solves are independent and uneven, so a pull-based queue balances
them; a worker or node that dies costs one retried task, not the run; nodes may join mid-run.

Each task reads its inputs through Ray's object store (torch pickles the tensors, bf16 included;
they arrive as private copies, so nothing a solve does can touch shared memory) and runs with
exactly the torch threads a ``--workers N`` process pool would give it, so both executors write
bit-identical checkpoints on machines with the same CPU and libraries.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os

import torch

import armor_vllm
import converters

from .executors import Executor, Solve
from .jobs import SolveTask

CONNECT_TIMEOUT_S = 3.0
SERVING = b"\x08\x01"  # grpc.health.v1.HealthCheckResponse(status=SERVING), serialised
MAX_RETRIES = 3  # re-runs after the worker or its node died (Ray's default, stated here on purpose)


def import_ray():
    """Ray is an optional extra: say how to get it rather than fail with a traceback."""
    try:
        import ray
    except ImportError as e:
        raise ValueError(f"--executor ray needs Ray ({e}); install it with pip install 'armor-vllm[ray]'") from None
    return ray


def _bootstrap_address(addr: str) -> str:
    """HOST:PORT of the cluster's GCS that ``ray.init(address=addr)`` would connect to (Ray's own
    resolution of 'auto' and of this machine's names)."""
    import_ray()
    from ray._private.services import canonicalize_bootstrap_address

    expected = "expected the GCS address HOST:PORT that `ray start --head` prints, or auto"
    if addr.startswith("ray://"):
        raise ValueError(f"--ray-address {addr}: Ray Client addresses are not supported; {expected}")
    try:
        resolved = canonicalize_bootstrap_address(addr)
    except ConnectionError as e:  # 'auto' with no (or several) Ray instances started here
        raise ValueError(f"--ray-address {addr}: {e}") from None
    except ValueError as e:
        raise ValueError(f"--ray-address {addr}: {e}; {expected}") from None
    host, _, port = (resolved or "").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--ray-address {addr}: {expected}")
    return resolved


def check_ray_address(addr: str) -> None:
    """Fail in seconds, naming the address, where ``ray.init`` would retry for minutes.

    Asks the standard gRPC health check, which Ray's GCS answers even to a client without its
    auth token: a bare TCP connect also succeeds against proxies and other servers. A Ray of
    another version is refused later by ``ray.init`` itself, with a message of its own.
    """
    import grpc  # a dependency of Ray

    gcs = _bootstrap_address(addr)
    with grpc.insecure_channel(gcs) as channel:
        try:
            status = channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=CONNECT_TIMEOUT_S)
            why = "" if status == SERVING else "its health check says it is not serving"
        except grpc.RpcError as e:
            why = e.details() or e.code().name
    if why:
        raise ValueError(f"--ray-address {addr}: no Ray cluster answers there ({gcs}: {why}); "
                         "start one with `ray start --head` or check the address")


class RayExecutor(Executor):
    """One Ray task per solve: ``num_cpus`` = the solve's threads, one GPU with ``--device cuda``,
    retried when its worker or node dies and on CUDA out-of-memory."""

    def __init__(self, device: str, workers: int, ray_address: str | None = None):
        self.ray = ray = import_ray()
        self.slots = workers
        self.threads = max(1, (os.cpu_count() or 1) // workers)  # as PoolExecutor: same threads, same bits
        self.gpu = device.startswith("cuda")
        self.device = "cuda" if self.gpu else device  # Ray sets CUDA_VISIBLE_DEVICES to the GPU it grants
        self.started = not ray.is_initialized()  # a Ray this process already joined is not ours to shut down
        if self.started and ray_address is None:
            # Ray runs its workers at nice 15 by default: on a machine shared with other jobs the
            # solves would get a sliver of the CPU that a --workers N pool gets at nice 0.
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=False, _system_config={"worker_niceness": 0})
        elif self.started:
            check_ray_address(ray_address)
            # Nodes of a cluster may not have this checkout: ship our two packages (source only: the
            # serving kernels are built per machine and no solve needs them). Third-party packages
            # (torch, ray) must already be installed there, in the same versions.
            ray.init(address=ray_address, logging_level=logging.WARNING, log_to_driver=False,
                     runtime_env={"py_modules": [converters, armor_vllm], "excludes": ["*.so", "__pycache__"]})
        self.remote: dict[Solve, object] = {}
        self.pending: set = set()
        # A task asking for what no node has would wait forever, silently.
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        if self.gpu and not any(r.get("GPU") for r in nodes):
            self.close()
            raise ValueError(f"--device {device}: no node of the Ray cluster has a GPU")
        self.num_cpus = max(1, min(self.threads, int(max(r.get("CPU", 0) for r in nodes))))  # solves still use `threads`

    def submit(self, fn: Solve, task: SolveTask) -> cf.Future:
        if fn not in self.remote:
            self.remote[fn] = self.ray.remote(
                num_cpus=self.num_cpus, num_gpus=1 if self.gpu else 0, max_retries=MAX_RETRIES,
                retry_exceptions=[torch.cuda.OutOfMemoryError])(fn)
        ref = self.remote[fn].remote(dataclasses.replace(task, device=self.device, threads=self.threads, show_iters=False))
        self.pending.add(ref)
        fut = ref.future()
        fut.add_done_callback(lambda _: self.pending.discard(ref))
        return fut

    def close(self) -> None:
        """Cancel what is still queued or running; disconnect, which stops only a Ray instance started here."""
        if not self.ray.is_initialized():
            return
        for ref in list(self.pending):
            self.ray.cancel(ref)
        if self.started:
            self.ray.shutdown()
