"""`make demo`: the main job on the embedded default model, end to end.

prepare SmolLM2-135M-Instruct -> convert it with ARMOR (quick preset) -> `vllm serve … --quantization
armor` -> ask a question through the OpenAI client -> print the answer and a table (perplexity dense
vs ARMOR, checkpoint size) -> stop the server.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from armor_vllm.format import ArmorFormatError, read_checkpoint, weight_bytes

from .default_model import default_model_dir
from .evaluate import perplexity


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_cli() -> str:
    """The `vllm` console script of this environment (the venv's bin/, beside this Python)."""
    return str(Path(sys.executable).with_name("vllm"))


def start_server(model: Path, port: int, log: Path, extra: list[str] = ()) -> subprocess.Popen:
    cmd = [vllm_cli(), "serve", str(model), "--quantization", "armor", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--served-model-name", "armor", *extra]
    print("$ vllm " + " ".join(cmd[1:]))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 600) -> None:
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}; last lines of {log}:\n"
                               + "\n".join(log.read_text().splitlines()[-30:]))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise TimeoutError(f"vllm serve not healthy after {timeout:.0f} s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("armor-demo")
    p.add_argument("--out", default="out/demo", help="where the checkpoint and logs go")
    p.add_argument("--iters", type=int, default=None, help="ARMOR iterations (default: the quick preset's)")
    p.add_argument("--windows", type=int, default=4, help="perplexity windows of 2048 tokens (wiki test split)")
    p.add_argument("--question", default="What is the capital of France?")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dense = default_model_dir()
    ckpt = out / "smollm2-135m-armor"
    print(f"[1/4] default model: {dense}")
    try:
        read_checkpoint(ckpt, validate=True)
        print(f"[2/4] reusing the ARMOR checkpoint in {ckpt} (delete it to convert again)")
    except ArmorFormatError:
        from .cli import convert_main

        print(f"[2/4] converting with ARMOR (quick preset) -> {ckpt}")
        convert_main([str(dense), str(ckpt), "--method", "armor", "--preset", "quick", "--block-size", "64",
                      "--overwrite"] + (["--iters", str(a.iters)] if a.iters else []))

    print("[3/4] serving it with vLLM and asking through the OpenAI client")
    port, log = _free_port(), out / "vllm-serve.log"
    proc = start_server(ckpt, port, log)
    try:
        wait_healthy(proc, port, log)
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        chat = client.chat.completions.create(model="armor", messages=[{"role": "user", "content": a.question}],
                                              max_tokens=48, temperature=0.0)
        print(f"\nQ: {a.question}\nA: {chat.choices[0].message.content.strip()}\n")
    finally:
        stop_server(proc)

    print(f"[4/4] perplexity on the wiki test split (first {a.windows} windows of 2048 tokens, fp32)")
    rows = []
    for name, path in (("dense", dense), ("ARMOR 2:4", ckpt)):
        r = perplexity(path, "wiki-test", 2048, a.windows)
        rows.append((name, r.ppl, weight_bytes(path)))
    print(f"\n{'model':<12}{'ppl':>10}{'checkpoint MB':>16}{'size vs dense':>15}")
    for name, ppl, size in rows:
        print(f"{name:<12}{ppl:>10.3f}{size / 1e6:>16.1f}{size / rows[0][2]:>15.2f}")


if __name__ == "__main__":
    main()
