"""Where the solves run, behind one interface: ``submit(task) -> concurrent.futures.Future``.

- ``inline``: in this process, one at a time (``--workers 1``, the default).
- ``pool``: a local process pool (``--workers N``), one GPU per worker with ``--device cuda``.
- ``ray``: Ray tasks on a local instance or a cluster (``--executor ray [--ray-address ADDR]``).

The driver only submits tasks and waits on futures, so every executor shares its resume logic:
results land in the work directory whichever executor computed them. ``slots`` is how many tasks
run at once; the driver keeps about that many queued so memory stays bounded.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import multiprocessing as mp
import os
import threading
import time
from typing import Callable

import torch

from .jobs import SolveTask

Solve = Callable[[SolveTask], tuple]


class Executor:
    slots = 1

    def submit(self, fn: Solve, task: SolveTask) -> cf.Future:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InlineExecutor(Executor):
    """Runs each task when submitted, in this process, with all of its threads and a per-iteration bar."""

    def __init__(self, device: str):
        self.device = device

    def submit(self, fn: Solve, task: SolveTask) -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(dataclasses.replace(task, device=self.device, show_iters=True)))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits, as a pool would
            fut.set_exception(e)
        return fut


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: a worker whose converter was killed (SIGKILL, SIGTERM: no shutdown reaches the pool)
    exits within a second instead of solving on as an orphan on the user's cores."""

    def watch():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


class PoolExecutor(Executor):
    """A spawn-context process pool; the machine's cores are split between the workers, GPUs dealt round-robin."""

    def __init__(self, device: str, workers: int):
        self.slots = workers
        self.devices = [device]
        if device == "cuda":
            self.devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"]
        self.threads = max(1, (os.cpu_count() or 1) // workers)
        self.pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_exit_with_parent,
                                           initargs=(os.getpid(),))
        self.n = 0

    def submit(self, fn: Solve, task: SolveTask) -> cf.Future:
        device = self.devices[self.n % len(self.devices)]
        self.n += 1
        return self.pool.submit(fn, dataclasses.replace(task, device=device, threads=self.threads))

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)

