"""Carry a checkpoint error from vLLM's engine process to the last lines the user sees.

With multiprocessing (``vllm serve``, the default ``LLM``), a load error is printed by the engine
core process, and the front-end then ends with its own traceback: "Engine core initialization
failed. See root cause above". When an ARMOR checkpoint starts to load, the process the user started
(the front-end: not a multiprocessing child) creates a private file and names it in an environment
variable its children inherit; the plugin appends its load errors there, and the front-end prints
them after vLLM's traceback when it dies of an uncaught exception.

The file lives in a fresh ``mkdtemp`` directory (mode 0700, unpredictable name) and is created 0600
with ``O_EXCL``; writers open it with ``O_NOFOLLOW`` and never create it, so no other local user can
point it somewhere else. The directory is removed when the front-end exits.
"""
from __future__ import annotations

import atexit
import functools
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path

ENV_VAR = "ARMOR_VLLM_ERROR_FILE"
_installed = False


def create_error_file() -> Path:
    """An empty file, mode 0600, in a new private directory (mode 0700) under the temp dir."""
    directory = Path(tempfile.mkdtemp(prefix="armor-vllm-"))
    path = directory / "errors.txt"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    return path


def install_in_frontend() -> None:
    """In the process the user started: create the file, name it for the children, hook the exit path.

    vLLM starts its engine and workers with multiprocessing; they inherit the variable and report.
    Any other process (``vllm serve`` launched by a script that used vLLM itself) is a front-end of its own.
    Runs once per process, when the first ARMOR checkpoint loads.
    """
    global _installed
    if _installed or multiprocessing.parent_process() is not None:
        return  # done already, or a process vLLM started: the front-end listens
    _installed = True
    path = create_error_file()
    atexit.register(shutil.rmtree, path.parent, ignore_errors=True)
    os.environ[ENV_VAR] = str(path)
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        previous(exc_type, exc, tb)
        lines = path.read_text().splitlines() if path.is_file() else []
        if lines and lines[0] not in str(exc):
            print(f"\nARMOR checkpoint error (raised in a vLLM engine process): {lines[0]}", file=sys.stderr)

    sys.excepthook = hook


def report(err: BaseException) -> None:
    """Record a load error for the front-end (one line; no-op where no front-end created the file)."""
    path = os.environ.get(ENV_VAR)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    except OSError:
        return  # the front-end's file is gone or is not a plain file: the error is still raised here
    with os.fdopen(fd, "a") as f:
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
