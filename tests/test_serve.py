"""`vllm serve CKPT --quantization armor` on a converted default model, queried with the openai client."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytest.importorskip("openai")

from converters.evaluation.evaluate import load_hf_model  # noqa: E402
from converters.commands.serving import VllmServer  # noqa: E402

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def armor_default(tmp_path_factory) -> Path:
    """The embedded model with every decoder linear converted (ARMOR, b=64, a few iterations)."""
    out = tmp_path_factory.mktemp("serve") / "smollm2-armor"
    subprocess.run([Path(sys.executable).with_name("armor-convert"), "default", out, "--preset", "quick",
                    "--nsamples", "4", "--seqlen", "256", "--iters", "2"],
                   check=True, env=dict(os.environ, TQDM_DISABLE="1"), stdout=subprocess.DEVNULL)
    return out


@pytest.fixture(scope="module")
def client(armor_default, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "vllm.log"
    with VllmServer(armor_default, log, extra=["--max-num-seqs", "4"]) as server:
        yield server.client()


def test_completion_matches_reconstructed_dense_model(client, armor_default):
    r = client.completions.create(model="armor", prompt=PROMPT, max_tokens=8, temperature=0.0)
    served = r.choices[0].text
    assert r.usage.completion_tokens == 8
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(armor_default)
    model = load_hf_model(armor_default)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert served == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_completion_streaming_equals_non_streaming(client):
    full = client.completions.create(model="armor", prompt=PROMPT, max_tokens=12, temperature=0.0).choices[0].text
    chunks = list(client.completions.create(model="armor", prompt=PROMPT, max_tokens=12, temperature=0.0, stream=True))
    assert len(chunks) > 1
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full


def test_chat_completion_and_stream(client):
    msgs = [{"role": "user", "content": "Name a large city in Europe."}]
    r = client.chat.completions.create(model="armor", messages=msgs, max_tokens=16, temperature=0.0)
    text = r.choices[0].message.content
    assert text.strip() and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="armor", messages=msgs, max_tokens=16, temperature=0.0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_models_endpoint_lists_the_checkpoint(client):
    assert [m.id for m in client.models.list().data] == ["armor"]


def test_load_error_is_the_last_thing_vllm_serve_prints(tmp_path):
    """vLLM ends with "Engine core initialization failed. See root cause above"; our cause follows it."""
    from tests import tiny_models

    tiny = tiny_models.build(tmp_path / "tiny")
    missing = "model.layers.1.self_attn.k_proj.b_in"
    bad = tiny_models.edit_checkpoint(tiny.armor, tmp_path / "bad",
                                      tensors_fn=lambda t: {k: v for k, v in t.items() if k != missing})
    server = VllmServer(bad, tmp_path / "vllm.log", max_model_len=256).start()
    try:
        assert server.proc.wait(300) != 0
    finally:
        server.stop()
    last = server.log.read_text().strip().splitlines()[-1]
    assert last.startswith("ARMOR checkpoint error") and f"{missing}: never loaded" in last, last


def test_stop_ends_the_whole_server_process_group(tmp_path):
    """The API server spawns an engine core; after stop() neither may be left (a leaked one holds GiBs)."""
    import psutil

    from tests import tiny_models

    tiny = tiny_models.build(tmp_path / "tiny")
    with VllmServer(tiny.armor, tmp_path / "vllm.log", max_model_len=256) as server:
        group = [server.proc.pid] + [c.pid for c in psutil.Process(server.proc.pid).children(recursive=True)]
        assert len(group) > 1, "expected the API server and its engine core"
    assert server.proc.returncode is not None and not server.healthy()
    assert not [pid for pid in group if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
