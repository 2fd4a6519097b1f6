"""armor-vllm: ARMOR 2:4 compression (converters/) and its vLLM serving plugin (armor_vllm/).

:func:`register` is the ``vllm.general_plugins`` entry point. vLLM calls it in every process it
starts (front-end, engine core, each worker), whatever model that process serves, so it only
registers the config class: the per-process set-up an ARMOR checkpoint needs waits until one loads
(:func:`armor_vllm.config.activate_for_armor_checkpoint`). It imports vLLM lazily:
``armor_vllm.format`` must stay importable where vLLM is not installed.

Importing the package also registers quant_method "armor" with transformers when transformers is
installed (:mod:`armor_vllm.hf_quantizer`; the checkpoints' config.json tells transformers users to
``import armor_vllm``). vLLM imports transformers' quantizer registry before it loads plugins, so in
a vLLM process this imports nothing new and only adds the key "armor".
"""
import importlib.util

_registered = False


def register() -> None:
    """Register quantization method "armor" with vLLM (safe to call any number of times)."""
    global _registered
    if _registered:
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from armor_vllm.config import ArmorConfig

    register_quantization_config("armor")(ArmorConfig)
    _registered = True


if importlib.util.find_spec("transformers") is not None:
    from armor_vllm.hf_quantizer import register as _register_with_transformers

    _register_with_transformers()
