"""transformers support: ``from_pretrained`` on an ARMOR checkpoint builds :class:`ArmorLinear` modules.

:func:`register` adds quant_method "armor" to transformers' quantizer registry (``import armor_vllm``
calls it when transformers is installed), so every client that loads through ``from_pretrained``
(pipelines, PEFT, lm-eval's ``--model hf``) gets the compressed model instead of one whose linears
were silently re-initialised. The modules hold the checkpoint's tensors under their stored names,
so ``save_pretrained`` writes a format-v2 checkpoint again, and they compute through the same
kernels as the vLLM plugin (imported at the first forward). Needs torch and transformers only.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from armor_vllm.format import (QUANT_METHOD, SUFFIXES, ArmorFormatError, ArmorQuantizationConfig, read_checkpoint,
                               validate_layer)
from armor_vllm.format.validate import fail


def layer_kernel(values, bitmask, b_in, b_out, scale=None):
    """``(x, bias) -> y`` for one stored layer, on the backend the vLLM plugin would pick
    (:func:`armor_vllm.kernels.choose.prepare_layer`), with ``F.linear`` on W = B_out·S·B_in as the fold."""
    from armor_vllm.kernels.choose import prepare_layer
    from armor_vllm.kernels.fold import fold_weight

    def fold(holder, s, b_in, b_out, widths):
        w = fold_weight(s, b_in, b_out, widths).to(s.dtype)
        return lambda _holder, x, bias: F.linear(x, w, bias)

    holder = torch.nn.Module()
    apply = prepare_layer(holder, values, bitmask, None if b_in is None else b_in[None], b_out, [values.shape[0]], fold,
                          scale)
    return lambda x, bias: apply(holder, x, bias)


class ArmorLinear(torch.nn.Module):
    """``y = x Wᵀ + bias``, W = blockdiag(b_out) · S · blockdiag(b_in), parameters named as stored.

    The kernel (a folded or sparse form of W) is built on the first forward. A parameter replaced,
    moved or edited in place (``load_state_dict``, ``p.copy_``, ``layer.weight_values = ...``) is
    validated against the format again before the next forward rebuilds the kernel: identity, data
    pointer, shape and autograd's version counter say which tensors changed, so steady-state forwards
    check nothing. Writes through ``p.data`` bypass the version counter, as they do for autograd, and
    are not seen. The kernel is never part of the state dict.
    """

    def __init__(self, prefix: str, in_features: int, out_features: int, bias: bool, qcfg: ArmorQuantizationConfig,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.prefix, self.qcfg = prefix, qcfg
        self.in_features, self.out_features = in_features, out_features
        n, k, b = out_features, in_features, qcfg.block_size

        def frozen(*shape, dtype=dtype):
            return torch.nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.weight_values = frozen(n, k // 2, dtype=torch.int8 if qcfg.quantized else dtype)
        self.weight_bitmask = frozen(n, k // 8, dtype=torch.uint8)
        self.register_parameter("weight_scale", frozen(n, 1) if qcfg.quantized else None)
        self.register_parameter("b_in", frozen(k // b, b, b) if b else None)
        self.register_parameter("b_out", frozen(n // b, b, b) if b else None)
        self.register_parameter("bias", frozen(n) if bias else None)
        self._kernel = (None, None)

    def extra_repr(self) -> str:
        b = None if self.b_in is None else self.b_in.shape[-1]
        return f"in_features={self.in_features}, out_features={self.out_features}, block_size={b}, bias={self.bias is not None}"

    def stored(self) -> dict[str, torch.Tensor]:
        """The layer's tensors by stored suffix (the absent optional ones left out)."""
        return {s: t for s, t in self.named_parameters(recurse=False) if s in SUFFIXES}

    def validate(self, files: dict[str, str] | None = None) -> None:
        """The tensors held now are a valid format-v2 layer, in one floating dtype (ArmorFormatError otherwise)."""
        tensors = self.stored()
        validate_layer(self.prefix, tensors, self.qcfg, files=files)
        key = "weight_scale" if self.qcfg.quantized else "weight_values"  # int8 values: the scale has the model's
        want = tensors[key].dtype
        for s, t in tensors.items():
            floating = s not in ("weight_bitmask", "weight_values") or s == key
            if floating and (t.dtype != want or not t.is_floating_point()):
                fail((files or {}).get(s, "<memory>"), f"{self.prefix}.{s}",
                     f"dtype {t.dtype}, expected the floating dtype of {key} ({want})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = self.stored()
        key = tuple((s, id(t), t.data_ptr(), t._version, t.dtype, t.shape, t.device) for s, t in tensors.items())
        if self._kernel[0] != key:
            with torch.no_grad():
                self.validate()
                self._kernel = (key, layer_kernel(self.weight_values, self.weight_bitmask, self.b_in, self.b_out,
                                                  self.weight_scale))
        return self._kernel[1](x, self.bias)


class ArmorHfConfig(QuantizationConfigMixin):
    """``quantization_config`` as transformers holds it: the format's dict, checked on construction."""

    def __init__(self, **fields):
        self.__dict__.update(ArmorQuantizationConfig.from_dict(fields, "config.json").to_dict())

    @property
    def armor(self) -> ArmorQuantizationConfig:
        """The format's :class:`~armor_vllm.format.ArmorQuantizationConfig`."""
        return ArmorQuantizationConfig.from_dict(self.to_dict(), "config.json")


class ArmorHfQuantizer(HfQuantizer):
    """Replaces the checkpoint's compressed linears by :class:`ArmorLinear` before the weights load,
    and checks every loaded layer against the format afterwards (transformers skips shape checks
    for quantized models and only warns about missing tensors)."""

    requires_calibration = True  # ARMOR weights come from armor-convert, not from quantizing on load
    quantization_config: ArmorHfConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise ValueError("an ARMOR model loads from a checkpoint directory (from_pretrained(DIR)), not a state dict")
        ckpt = read_checkpoint(Path(checkpoint_files[0]).parent)
        qcfg = self.quantization_config.armor
        self.tensor_files = ckpt.tensor_files
        for prefix in ckpt.layer_prefixes():
            try:
                linear = model.get_submodule(prefix)
            except AttributeError:
                linear = None
            if not isinstance(linear, torch.nn.Linear):
                raise ArmorFormatError(f"{_layer_file(ckpt.tensor_files, prefix)}: compressed layer '{prefix}': "
                                       f"{type(model).__name__} has no nn.Linear of that name "
                                       f"(found {type(linear).__name__})")
            model.set_submodule(prefix, ArmorLinear(prefix, linear.in_features, linear.out_features,
                                                    linear.bias is not None, qcfg, linear.weight.dtype,
                                                    linear.weight.device))

    def _process_model_after_weight_loading(self, model, **kwargs):
        for module in model.modules():
            if isinstance(module, ArmorLinear):
                check_loaded(module, self.tensor_files)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def check_loaded(module: ArmorLinear, tensor_files: dict[str, str]) -> None:
    """The loaded layer is exactly the checkpoint's (no tensor missing or extra) and valid format v2."""
    prefix, params = module.prefix, dict(module.named_parameters(recurse=False))
    stored = {s for s in (*SUFFIXES, "weight") if f"{prefix}.{s}" in tensor_files}
    if missing := sorted(params.keys() - stored):
        raise ArmorFormatError(f"{_layer_file(tensor_files, prefix)}: tensor '{prefix}.{missing[0]}': missing "
                               f"(block_size {module.qcfg.block_size}, bias {module.bias is not None} need {sorted(params)})")
    if extra := sorted(stored - params.keys()):
        raise ArmorFormatError(f"{tensor_files[f'{prefix}.{extra[0]}']}: tensor '{prefix}.{extra[0]}': extra tensor; "
                               f"this layer holds {sorted(params)}")
    module.validate(files={s: tensor_files[f"{prefix}.{s}"] for s in stored})


def _layer_file(tensor_files: dict[str, str], prefix: str) -> str:
    """The shard that holds a compressed layer's values (or, if those are missing, its bitmask)."""
    return tensor_files.get(f"{prefix}.weight_values") or tensor_files[f"{prefix}.weight_bitmask"]


def register() -> None:
    """Add quant_method "armor" to transformers' config and quantizer registries (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(ArmorHfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(ArmorHfQuantizer)
