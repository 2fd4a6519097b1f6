"""`vllm serve` as a managed subprocess: the demo, the serve tests and the soak benchmark all start it this way.

One server per `VllmServer`: a free loopback port, its own process group (the API server spawns
an engine core process, and stopping must reach both), its output in a log file (the only place
vLLM's errors go), /health polled until it answers, and on exit SIGTERM to the group, SIGKILL
after a grace period, so a hung engine never outlives the caller.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_cli() -> str:
    """The `vllm` console script of this environment (the venv's bin/, beside this Python)."""
    return str(Path(sys.executable).with_name("vllm"))


class VllmServer:
    """`vllm serve MODEL` on 127.0.0.1, fp32, eager; a context manager that returns it once /health answers.

    `quantization=None` serves a dense model; `extra` is appended to the command line (later flags win).
    `VLLM_CPU_KVCACHE_SPACE` defaults to 1 GiB: unset, vLLM takes most of the machine's memory for it.
    """

    def __init__(self, model: str | Path, log: str | Path, *, quantization: str | None = "armor",
                 name: str = "armor", max_model_len: int = 2048, extra: list[str] | tuple[str, ...] = (),
                 env: dict[str, str] | None = None, health_timeout: float = 600):
        self.model, self.log, self.name, self.health_timeout = Path(model), Path(log), name, health_timeout
        self.port = free_port()
        quant = ["--quantization", quantization] if quantization else []
        self.cmd = [vllm_cli(), "serve", str(model), *quant, "--host", "127.0.0.1", "--port", str(self.port),
                    "--dtype", "float32", "--max-model-len", str(max_model_len), "--enforce-eager",
                    "--served-model-name", name, *extra]
        self.env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self):
        """A synchronous OpenAI client for this server (no retries: a failed request must show)."""
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key="none", max_retries=0)

    def start(self) -> VllmServer:
        """Launch without waiting (a caller that expects the start to fail waits on `proc` itself)."""
        print("$ vllm " + " ".join(self.cmd[1:]), flush=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as out:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        return self

    def healthy(self, timeout: float = 5) -> bool:
        """One GET /health: True on 200."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=timeout) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_healthy(self) -> None:
        """Poll /health once a second; a server that exits or stays silent fails with its log's last lines."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.health_timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve {self.model} exited with {self.proc.returncode}; last lines of "
                                   f"{self.log}:\n{self.log_tail()}")
            if self.healthy(timeout=2):
                return
            time.sleep(1)
        raise TimeoutError(f"vllm serve {self.model}: /health did not answer within {self.health_timeout:.0f} s; "
                           f"last lines of {self.log}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, grace: float = 60) -> None:
        """SIGTERM to the process group, SIGKILL to whatever of it is left after `grace` seconds."""
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the server leads its own group
        _signal_group(pgid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + 5  # the engine core may still be shutting down after the API server
        while _signal_group(pgid, 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _signal_group(pgid, signal.SIGKILL):
            print(f"vllm serve {self.model}: SIGKILL to what was left of its process group after SIGTERM", flush=True)
        self.proc.wait()

    def __enter__(self) -> VllmServer:
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> bool:
    """Send `sig` to the group; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
