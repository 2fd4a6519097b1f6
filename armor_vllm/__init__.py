"""armor-vllm: ARMOR 2:4 compression (converters/) and its vLLM serving plugin (armor_vllm/).

:func:`register` is the ``vllm.general_plugins`` entry point. vLLM calls it once in every
process it starts (front-end, engine core, each worker), so it is idempotent and cheap, and
it imports vLLM lazily: ``armor_vllm.format`` must stay importable where vLLM is not installed.
"""

_registered = False


def register() -> None:
    """Register quantization method "armor" with vLLM (safe to call any number of times)."""
    global _registered
    if _registered:
        return
    import torch
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.platforms import current_platform

    from armor_vllm.config import ArmorConfig

    register_quantization_config("armor")(ArmorConfig)
    if current_platform.is_cpu() and hasattr(torch.cpu, "_init_amx"):
        # vLLM's bf16 CPU attention uses AMX tiles; a process that never asked the kernel for
        # tile permission (eager mode skips the warm-up that does) dies with SIGILL.
        torch.cpu._init_amx()
    _registered = True
