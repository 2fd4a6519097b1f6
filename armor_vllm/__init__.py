"""armor-vllm: ARMOR 2:4 compression (converters/) and its vLLM serving plugin (armor_vllm/).

:func:`register` is the ``vllm.general_plugins`` entry point. vLLM calls it once in every
process it starts (front-end, engine core, each worker), so it is idempotent and cheap, and
it imports vLLM lazily: ``armor_vllm.format`` must stay importable where vLLM is not installed.

Importing the package also registers quant_method "armor" with transformers
(:mod:`armor_vllm.hf_quantizer`), deferred until transformers executes its quantizer registry,
so ``import armor_vllm`` stays cheap where transformers is never used.
"""
import importlib.abc
import importlib.util
import sys

_registered = False
_TRANSFORMERS_REGISTRY = "transformers.quantizers.auto"


def register() -> None:
    """Register quantization method "armor" with vLLM (safe to call any number of times)."""
    global _registered
    if _registered:
        return
    import torch
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.platforms import current_platform

    from armor_vllm.config import ArmorConfig
    from armor_vllm import vllm_logging
    from armor_vllm.load_errors import install_in_frontend

    register_quantization_config("armor")(ArmorConfig)
    install_in_frontend()
    vllm_logging.install()
    if current_platform.is_cpu() and hasattr(torch.cpu, "_init_amx"):
        # vLLM's bf16 CPU attention uses AMX tiles; a process that never asked the kernel for
        # tile permission (eager mode skips the warm-up that does) dies with SIGILL.
        torch.cpu._init_amx()
    _registered = True


def _register_with_transformers() -> None:
    from armor_vllm.hf_quantizer import register as register_hf

    register_hf()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``hook`` right after module ``name`` first executes, wherever that import comes from."""

    def __init__(self, name: str, hook):
        self.name, self.hook = name, hook

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            self.hook()

        spec.loader.exec_module = exec_module
        return spec


if _TRANSFORMERS_REGISTRY in sys.modules:
    _register_with_transformers()
elif importlib.util.find_spec("transformers") is not None:
    sys.meta_path.insert(0, _AfterImport(_TRANSFORMERS_REGISTRY, _register_with_transformers))
