"""The plugin runs in every vLLM process (it is pip-installed): serving a dense model, it must change nothing.

One fresh interpreter serves the dense twin, then the ARMOR checkpoint (in-process engines), and reports
what each left behind: our hook in the sys.excepthook chain, the error-file variable, armor entries in
the temp dir, calls to ``torch.cpu._init_amx`` (observed by wrapping it before vLLM starts), the
cast-warning filter, the kernels.
The ARMOR run shows the same observers see the set-up when a checkpoint does need it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from armor_vllm import load_errors  # noqa: E402
from tests.vllm_helpers import BASE_ENV  # noqa: E402

SCRIPT = r"""
import json, logging, os, sys, tempfile
sys.path.insert(0, sys.argv[1])
import torch

amx_calls = []
_init_amx = torch.cpu._init_amx


def observed_init_amx():
    amx_calls.append(1)
    return _init_amx()


torch.cpu._init_amx = observed_init_amx


def hook_modules(hook):  # modules of a hook and of those it wraps (torch.distributed wraps the one it finds)
    seen, todo = {}, [hook]
    while todo:
        f = todo.pop()
        if id(f) not in seen:
            seen[id(f)] = getattr(f, "__module__", None)
            todo += [c.cell_contents for c in getattr(f, "__closure__", None) or () if callable(c.cell_contents)]
    return set(seen.values())


def state():
    from armor_vllm import load_errors, vllm_logging
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    path = os.environ.get(load_errors.ENV_VAR)
    mode = lambda p: oct(os.stat(p).st_mode & 0o777)  # noqa: E731
    return {"plugin_registered": "armor" in QUANTIZATION_METHODS,
            "armor_excepthook": "armor_vllm.load_errors" in hook_modules(sys.excepthook),
            "error_file": path, "modes": path and [mode(os.path.dirname(path)), mode(path)],
            "armor_temp_entries": sorted(n for n in os.listdir(tempfile.gettempdir()) if "armor" in n),
            "amx_calls": len(amx_calls), "kernels_imported": "armor_vllm.kernels" in sys.modules,
            "cast_filter": any(isinstance(f, vllm_logging.OneCastWarningPerDtype)
                               for f in logging.getLogger(vllm_logging.CAST_LOGGER).filters)}


if __name__ == "__main__":
    import vllm.engine.arg_utils  # noqa: F401  (what a vLLM process has imported when it loads its plugins)

    before = set(sys.modules)
    import armor_vllm  # noqa: F401

    imported = sorted(m for m in set(sys.modules) - before if not m.startswith("armor_vllm"))
    from tests.vllm_helpers import EAGER, run_greedy

    run_greedy(sys.argv[2], **EAGER)
    dense = state()
    run_greedy(sys.argv[3], quantization="armor", **EAGER)
    from vllm.platforms import current_platform

    print("RESULT " + json.dumps({"imported": imported, "dense": dense, "armor": state(),
                                  "cpu_platform": current_platform.is_cpu()}))
"""


def test_serving_a_dense_model_leaves_the_process_untouched(tiny, tmp_path):
    ckpt = tiny("llama")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != load_errors.ENV_VAR}
    env.update(BASE_ENV, TMPDIR=str(tmp), VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CACHE_ROOT=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(Path(__file__).parents[1]), str(ckpt.dense),
                           str(ckpt.armor)], env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-6000:]
    got = json.loads(lines[-1][len("RESULT "):])

    assert got["imported"] == []  # import armor_vllm adds no transformers (or other) modules to a vLLM process
    assert got["dense"] == {"plugin_registered": True, "armor_excepthook": False, "error_file": None, "modes": None,
                            "armor_temp_entries": [], "amx_calls": 0, "kernels_imported": False, "cast_filter": False}

    armor = got["armor"]
    error_dir = Path(armor["error_file"]).parent
    assert error_dir.parent == tmp and armor["armor_temp_entries"] == [error_dir.name]
    assert armor["modes"] == [oct(0o700), oct(0o600)]
    assert armor["armor_excepthook"] and armor["cast_filter"] and armor["kernels_imported"]
    assert armor["amx_calls"] == (1 if got["cpu_platform"] else 0)  # once per process, however many layers
    assert not error_dir.exists()  # removed when the front-end exited
