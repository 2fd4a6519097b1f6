"""The vLLM ``QuantizationConfig`` for ARMOR checkpoints: parses config.json, picks a method per layer.

``quantization_config`` is read by :class:`armor_vllm.format.ArmorQuantizationConfig`, so a bad
checkpoint fails here with the format's own message. ``targets``/``ignore`` follow
compressed-tensors semantics (exact HF module names, ``re:`` regexes, class names such as
"Linear"), matched with vLLM's compressed-tensors helpers so that fused vLLM layers
(``qkv_proj``, ``gate_up_proj``) match through the model's ``packed_modules_mapping``.

vLLM runs the plugin's ``register()`` in every process, whatever it serves; what only an ARMOR
checkpoint needs (:func:`activate_for_armor_checkpoint`) runs where this config is built from
config.json (the front-end) and where it hands out layer methods (engine core and workers, which
receive the config pickled).
"""
from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.quantization.compressed_tensors.utils import (
    find_matched_target,
    should_ignore_layer,
)
from vllm.platforms import current_platform

from armor_vllm import load_errors, vllm_logging
from armor_vllm.format import QUANT_METHOD, ArmorFormatError, ArmorQuantizationConfig
from armor_vllm.load_errors import reported

_active = False


def activate_for_armor_checkpoint() -> None:
    """What a process serving an ARMOR checkpoint needs, once: the error file and exit hook (front-end),
    one dtype-cast warning per dtype pair, AMX tile permission (CPU)."""
    global _active
    if _active:
        return
    load_errors.install_in_frontend()
    vllm_logging.install()
    if current_platform.is_cpu() and hasattr(torch.cpu, "_init_amx"):
        # vLLM's bf16 CPU attention uses AMX tiles; a process that never asked the kernel for
        # tile permission (eager mode skips the warm-up that does) dies with SIGILL.
        torch.cpu._init_amx()
    _active = True


class ArmorConfig(QuantizationConfig):
    """quant_method "armor": W = blockdiag(b_out) · S · blockdiag(b_in), S 2:4 sparse."""

    @reported
    def __init__(self, qcfg: ArmorQuantizationConfig | None = None):
        super().__init__()
        if qcfg is None:
            # vLLM constructs the config without arguments when config.json has no quantization_config
            raise ArmorFormatError(
                "--quantization armor: the model's config.json has no quantization_config, so it is not an ARMOR "
                "checkpoint (a dense model?) or its quantization_config was removed. Restore it, or serve a dense "
                "model without --quantization armor")
        self.qcfg = qcfg
        self.targets = list(self.qcfg.targets)
        self.ignore = list(self.qcfg.ignore)

    def __repr__(self) -> str:
        return f"ArmorConfig({self.qcfg})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.float16, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        # The fold backend runs anywhere vLLM does; 2:4 tensor cores (sm80+) are chosen at load.
        return 70

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    @reported
    def from_config(cls, config: dict[str, Any]) -> "ArmorConfig":
        activate_for_armor_checkpoint()  # before the engine processes start: they inherit the error file
        return cls(ArmorQuantizationConfig.from_dict(config))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        # Claim checkpoints that say quant_method "armor" unless the user asked for something
        # else, in which case vLLM reports the mismatch.
        if hf_quant_cfg.get("quant_method") == QUANT_METHOD and user_quant in (None, QUANT_METHOD):
            return QUANT_METHOD
        return None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        """Rename HF module paths in targets/ignore to vLLM's (class names and regexes stay)."""

        def mapped(names: list[str]) -> list[str]:
            out = []
            for nm in names:
                new = hf_to_vllm_mapper.map_name(nm) if "." in nm and not nm.startswith("re:") else nm
                if new is not None:
                    out.append(new)
            return out

        self.targets, self.ignore = mapped(self.targets), mapped(self.ignore)

    def is_compressed(self, layer: torch.nn.Module, prefix: str) -> bool:
        """Whether the checkpoint stores this vLLM layer compressed (all fused shards agree)."""
        mapping = self.packed_modules_mapping
        if should_ignore_layer(prefix, self.ignore, mapping):
            return False
        return find_matched_target(prefix, layer, self.targets, mapping) is not None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        activate_for_armor_checkpoint()  # the model is being built in this process (engine core, worker)
        if not isinstance(layer, LinearBase):
            return None  # embeddings, lm_head, attention stay dense
        if not self.is_compressed(layer, prefix):
            return UnquantizedLinearMethod()
        from armor_vllm.linear_method import ArmorLinearMethod  # the kernels, only where an ARMOR model is built

        return ArmorLinearMethod(self)
