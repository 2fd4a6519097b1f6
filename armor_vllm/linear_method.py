"""``ArmorLinearMethod``: loads an ARMOR layer into vLLM, validates it, hands it to a backend.

Per-rank parameter layout (N = Σ output partitions, K = input features per rank, b = block):

- ``weight_values`` [N, K/2] (model dtype, or int8 for W8A16) and ``weight_bitmask`` uint8 [N, K/8]:
  rows split by column parallelism, columns by row parallelism (2:4 groups never straddle a rank boundary).
- ``weight_scale`` [N, 1] (W8A16 only, model dtype): split along N like the rows, whole under row
  parallelism (compressed-tensors' channel scale, ``ChannelQuantScaleParameter``).
- ``b_out`` [N/b, b, b]: packed along N by b, so fused-shard offsets and TP slices divide by b;
  row-parallel layers keep it whole (B_out before the all-reduce is exact by linearity).
- ``b_in`` [n_shards, K/b, b, b]: one slot per fused shard (q/k/v, gate/up), since ARMOR learns
  a separate B_in for each and a single slot would be overwritten by the last shard loaded.

vLLM does not track which tensors a quantized model actually loaded, so every parameter starts
as a sentinel no checkpoint can contain (NaN; 0xFF bitmask bytes, which keep 4 of 4; int8 values
all -128, which a symmetric quantizer never writes) and ``process_weights_after_loading`` names any
tensor still holding it.
"""
from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import (
    LinearMethodBase,
    ReplicatedLinear,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    ModelWeightParameter,
    PackedColumnParameter,
)

from armor_vllm import kernels
from armor_vllm.kernels.choose import prepare_layer
from armor_vllm.load_errors import reported
from armor_vllm.format import SUFFIXES, ArmorFormatError, rank_width_problems, validate_layer

_UNLOADED_MASK_BYTE = 0xFF
_UNLOADED_INT8 = -128


class InputTransformParameter(BasevLLMParameter):
    """B_in [n_shards, K/b, b, b]: fused shards load into their own slot, row parallelism slices K."""

    def _load_slot(self, loaded_weight: torch.Tensor, slot: int, shard_k: bool = False):
        if shard_k:
            kb = self.data.shape[1]
            loaded_weight = loaded_weight.narrow(0, self.tp_rank * kb, kb)
        assert self.data[slot].shape == loaded_weight.shape
        self.data[slot].copy_(loaded_weight)

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor):
        self._load_slot(loaded_weight, 0)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor):
        self._load_slot(loaded_weight, 0, shard_k=True)

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs):
        self._load_slot(loaded_weight, self._shard_id_as_int(kwargs["shard_id"]))

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs):
        self._load_slot(loaded_weight, self._shard_id_as_int(kwargs["shard_id"]))


def _unloaded(t: torch.Tensor) -> torch.Tensor:
    """Where ``t`` still holds the sentinel ``create_weights`` filled it with."""
    if t.is_floating_point():
        return t.isnan()
    return t == (_UNLOADED_MASK_BYTE if t.dtype == torch.uint8 else _UNLOADED_INT8)


def _load_whole(param: BasevLLMParameter, loaded_weight: torch.Tensor) -> None:
    """Loader for ReplicatedLinear's b_in/b_out: the whole tensor (b_in into its single slot)."""
    target = param.data[0] if isinstance(param, InputTransformParameter) else param.data
    assert target.shape == loaded_weight.shape
    target.copy_(loaded_weight)


@register_weight_loader_v2_supported_method
class ArmorLinearMethod(LinearMethodBase):
    """W = blockdiag(b_out) · S · blockdiag(b_in), S 2:4 sparse along K, its kept values int8 or not (format v2)."""

    def __init__(self, quant_config):
        self.quant_config = quant_config
        self.block_size: int | None = quant_config.qcfg.block_size

    # ------------------------------------------------------------------ loading
    @reported
    def create_weights(self, layer, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        k, n, b = input_size_per_partition, sum(output_partition_sizes), self.block_size
        self._check_divisible(layer, k, output_partition_sizes)
        layer.logical_widths = list(output_partition_sizes)
        loader = extra_weight_attrs["weight_loader"]
        nan = dict(fill_value=float("nan"), dtype=params_dtype)
        quantized = self.quant_config.qcfg.quantized
        values = (torch.full((n, k // 2), _UNLOADED_INT8, dtype=torch.int8) if quantized
                  else torch.full((n, k // 2), **nan))
        params = {
            "weight_values": ModelWeightParameter(data=values, input_dim=1, output_dim=0, weight_loader=loader),
            "weight_bitmask": ModelWeightParameter(data=torch.full((n, k // 8), _UNLOADED_MASK_BYTE, dtype=torch.uint8),
                                                   input_dim=1, output_dim=0, weight_loader=loader),
        }
        if quantized:
            params["weight_scale"] = ChannelQuantScaleParameter(data=torch.full((n, 1), **nan), output_dim=0,
                                                                weight_loader=loader)
        if b is not None:
            if isinstance(layer, ReplicatedLinear):  # its own loader copies whole tensors, knows no slots
                loader = _load_whole
            params["b_out"] = PackedColumnParameter(data=torch.full((n // b, b, b), **nan), output_dim=0,
                                                    packed_dim=0, packed_factor=b, weight_loader=loader)
            slots = len(output_partition_sizes)
            params["b_in"] = InputTransformParameter(data=torch.full((slots, k // b, b, b), **nan),
                                                     weight_loader=loader)
        for name, param in params.items():
            param.weight_loader = self._explaining_loader(layer, name, param.weight_loader)
            layer.register_parameter(name, param)

    def _check_divisible(self, layer, k: int, widths: list[int]) -> None:
        problems = rank_width_problems(k, widths, self.block_size)
        if problems:
            raise ValueError(f"ARMOR layer {layer.prefix} (tensor parallel size {layer.tp_size}): "
                             + "; ".join(problems) + ". Use a block size dividing every per-rank width "
                             "(head_dim, intermediate/tp, hidden/tp) or a smaller tensor parallel size.")

    def _explaining_loader(self, layer, suffix: str, loader):
        """Wrap a weight loader so a misfit tensor is reported by its checkpoint name."""

        @reported
        def load(param, loaded_weight, *args, **kwargs):
            try:
                return loader(param, loaded_weight, *args, **kwargs)
            except torch.OutOfMemoryError:
                raise
            except (AssertionError, RuntimeError) as e:  # failed narrow() or shape assert
                shard = args[0] if args else kwargs.get("loaded_shard_id")
                name = f"{self._checkpoint_prefix(layer, shard)}.{suffix}"
                raise ArmorFormatError(
                    f"{name}: checkpoint tensor {loaded_weight.dtype} {list(loaded_weight.shape)} does not fit "
                    f"vLLM parameter {layer.prefix}.{suffix} {list(param.shape)} (tp rank {layer.tp_rank} of "
                    f"{layer.tp_size}, block_size {self.block_size}): {e!r}") from e

        return load

    def _checkpoint_prefix(self, layer, shard) -> str:
        """HF module name of one shard: qkv_proj + "k" -> k_proj, gate_up_proj + 1 -> up_proj."""
        head, _, proj = layer.prefix.rpartition(".")
        parts = self.quant_config.packed_modules_mapping.get(proj)
        if parts and shard is not None:
            idx = {"q": 0, "k": 1, "v": 2}.get(shard, shard)
            if isinstance(idx, int) and idx < len(parts):
                proj = parts[idx]
        return f"{head}.{proj}" if head else proj

    # ------------------------------------------------------------------ after loading
    @reported
    def process_weights_after_loading(self, layer) -> None:
        widths, b = layer.logical_widths, self.block_size
        qcfg = self.quant_config.qcfg
        values, bitmask = layer.weight_values.data, layer.weight_bitmask.data
        scale = layer.weight_scale.data if qcfg.quantized else None
        b_in, b_out = (None, None) if b is None else (layer.b_in.data, layer.b_out.data)
        offset = 0
        for i, w in enumerate(widths):
            shard = i if len(widths) > 1 else None
            rows = slice(offset, offset + w)
            tensors = {"weight_values": values[rows], "weight_bitmask": bitmask[rows]}
            if scale is not None:
                tensors["weight_scale"] = scale[rows]
            if b is not None:
                tensors["b_in"], tensors["b_out"] = b_in[i], b_out[offset // b:(offset + w) // b]
            name = self._checkpoint_prefix(layer, shard)
            for suffix, t in tensors.items():
                if _unloaded(t).all():
                    raise ArmorFormatError(f"{name}.{suffix}: never loaded (missing from the checkpoint?); "
                                           f"vLLM layer {layer.prefix}, tp rank {layer.tp_rank}")
            validate_layer(name, tensors, qcfg, files=dict.fromkeys(SUFFIXES, f"checkpoint (tp rank {layer.tp_rank})"))
            offset += w

        if b_in is not None and len(b_in) > 1:
            if all(torch.equal(b_in[0], slot) for slot in b_in[1:]):
                b_in = b_in[:1]  # shared input transform: one GEMM instead of one per shard
            elif qcfg.shared_input_transform:
                raise ArmorFormatError(f"{layer.prefix}.b_in: quantization_config says "
                                       "shared_input_transform but the fused shards' b_in differ")
        for name in ("weight_values", "weight_bitmask", "weight_scale", "b_in", "b_out"):
            if hasattr(layer, name):
                delattr(layer, name)
        # values and bitmask go to the backend as loaded: sparse_cpu keeps them (the checkpoint's layout is
        # the kernel's), the others expand S themselves. This runs before vLLM compiles the model and captures
        # its CUDA graphs, so the CUDA 2:4 backend's load-time trial may run and time kernels here.
        layer.armor_apply = prepare_layer(layer, values, bitmask, b_in, b_out, widths, fold=kernels.fold.prepare,
                                          scale=scale)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return layer.armor_apply(layer, x, bias)
