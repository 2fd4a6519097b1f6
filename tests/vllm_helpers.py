"""Shared by the vLLM engine tests: tiny checkpoints served in-process, greedy generation, comparisons.

Engines run in the test process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, eager, fp32, ``uni``
executor: ~5 s each); vLLM tolerates several in a row once ``cleanup_dist_env_and_memory`` runs
between them. Callbacks for ``llm.apply_model`` live here because they must be importable.
The fixtures (``vllm_cache``, ``tiny``, ``dense_result``) live in ``tests/conftest.py``; a test module
uses them by name and ``pytest.mark.usefixtures("vllm_cache")``.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny_models

MAX_TOKENS = 12
BASE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
            "TOKENIZERS_PARALLELISM": "false"}
EAGER = dict(enforce_eager=True, distributed_executor_backend="uni")


@contextlib.contextmanager
def engine(model, env: dict | None = None, **llm_kwargs):
    """An ``LLM`` for a tiny model (fp32 unless ``dtype`` is given, max_model_len 256) with ``env`` set while it lives."""
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    saved = {k: os.environ.get(k) for k in {**BASE_ENV, **(env or {})}}
    os.environ.update({**BASE_ENV, **(env or {})})
    llm = None
    try:
        llm = LLM(model=str(model), **{"dtype": "float32", "max_model_len": 256, "max_num_seqs": 4, "seed": 0,
                                       **llm_kwargs})
        yield llm
    finally:
        del llm
        cleanup_dist_env_and_memory()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def greedy(llm) -> dict:
    """Greedy token ids and their logprobs for tiny_models.PROMPTS."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0, ignore_eos=True)
    tokens, logprobs = [], []
    for out in llm.generate(tiny_models.PROMPTS, params, use_tqdm=False):
        c = out.outputs[0]
        tokens.append(list(c.token_ids))
        logprobs.append([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
    return {"tokens": tokens, "logprobs": logprobs}


def quant_method_names(model) -> dict[str, str]:
    """``apply_model`` callback: vLLM module name -> quant method class, for linear layers."""
    return {name: type(m.quant_method).__name__ for name, m in model.named_modules()
            if hasattr(m, "quant_method") and name.endswith("proj")}


def input_transform_slots(model) -> dict[str, int]:
    """``apply_model`` callback: how many b_in slots each ARMOR layer kept after loading."""
    return {name: m.b_in.shape[0] for name, m in model.named_modules() if getattr(m, "b_in", None) is not None}


def run_greedy(model, env: dict | None = None, **llm_kwargs) -> dict:
    with engine(model, env, **llm_kwargs) as llm:
        return greedy(llm)


def run_in_subprocess(model, env: dict, timeout: float = 400, **llm_kwargs) -> dict:
    """:func:`run_greedy` in a fresh interpreter (own engine processes and environment)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import tests.vllm_helpers as t\n"
            "if __name__ == '__main__':\n"
            "    r = t.run_greedy(sys.argv[2], **json.loads(sys.argv[3]))\n"
            "    print('RESULT ' + json.dumps(r))\n")
    args = json.dumps(dict(llm_kwargs))
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parents[1]), str(model), args],
                          env={**os.environ, **BASE_ENV, **env}, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"engine subprocess failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def assert_same_generation(got: dict, want: dict, atol: float = 1e-3) -> None:
    assert got["tokens"] == want["tokens"]
    for g, w in zip(got["logprobs"], want["logprobs"]):
        assert g == pytest.approx(w, abs=atol)


def armor_layer_params(model) -> dict[str, list[str]]:
    """``apply_model`` callback: parameter names each ARMOR layer kept after loading (shows the backend)."""
    return {name: sorted(n for n, _ in m.named_parameters(recurse=False)) for name, m in model.named_modules()
            if type(getattr(m, "quant_method", None)).__name__ == "ArmorLinearMethod"}


def armor_core_tensors(model) -> dict[str, dict[str, tuple[str, list[int]]]]:
    """``apply_model`` callback: dtype and shape of the S tensors (values, scale) each ARMOR layer holds after loading."""
    return {name: {n: (str(p.dtype), list(p.shape)) for n, p in m.named_parameters(recurse=False)
                   if n in ("weight_values", "weight_scale")}
            for name, m in model.named_modules() if type(getattr(m, "quant_method", None)).__name__ == "ArmorLinearMethod"}
