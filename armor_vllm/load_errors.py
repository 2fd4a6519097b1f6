"""Carry a checkpoint error from vLLM's engine process to the last lines the user sees.

With multiprocessing (``vllm serve``, the default ``LLM``), a load error is printed by the engine
core process, and the front-end then ends with its own traceback: "Engine core initialization
failed. See root cause above". The process the user started (the front-end: not a multiprocessing
child) names a file in an environment variable its children inherit; the plugin appends its load errors there,
and the front-end prints them after vLLM's traceback when it dies of an uncaught exception.
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import sys
import tempfile
from pathlib import Path

ENV_VAR = "ARMOR_VLLM_ERROR_FILE"


def install_in_frontend() -> None:
    """In the process the user started: name the file and hook the exit path.

    vLLM starts its engine and workers with multiprocessing; they inherit the variable and report.
    Any other process (``vllm serve`` launched by a script that used vLLM itself) is a front-end of its own.
    """
    if multiprocessing.parent_process() is not None:
        return  # a process vLLM started: the front-end listens
    path = Path(tempfile.gettempdir()) / f"armor-vllm-errors-{os.getpid()}.txt"
    os.environ[ENV_VAR] = str(path)
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        first = path.read_text().splitlines()[0] if path.is_file() and path.stat().st_size else ""
        if first and first not in str(exc):
            print(f"\nARMOR checkpoint error (raised in a vLLM engine process): {first}", file=sys.stderr)

    sys.excepthook = hook
    atexit.register(lambda: path.unlink(missing_ok=True))


def report(err: BaseException) -> None:
    """Record a load error for the front-end (one line; no-op outside vLLM)."""
    path = os.environ.get(ENV_VAR)
    if path:
        with open(path, "a") as f:
            f.write(" ".join(str(err).split()) + "\n")


def reported(fn):
    """Decorator for the plugin's load steps: a bad checkpoint (ValueError) is reported, then re-raised."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as e:
            report(e)
            raise

    return wrapper
