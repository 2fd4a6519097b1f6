"""int8 W8A8 and int4 W4A16 checkpoints of a dense HF Llama in the layouts vLLM loads, for the peer table.

Why our own writer: the peer table compares speed and bytes, not quality, of a model with random
weights, so round-to-nearest is all the quantization it needs, and no GPTQ/llm-compressor run is
available offline. Every decoder-layer linear (``model.layers.*.*_proj``) is quantized; embeddings,
norms and the lm_head stay in the model dtype, as both formats keep them by default.

- W8A8 (compressed-tensors ``int-quantized``, the ``INT8_W8A8`` preset: int8 weights with one symmetric
  scale per output channel, activations quantized per token at run time): ``weight`` int8 [N, K] and
  ``weight_scale`` [N, 1], as llm-compressor saves them; vLLM serves it with ``CompressedTensorsW8A8Int8``.
- W4A16 (GPTQ layout, 4 bits, group 128, symmetric, no act-order): ``qweight`` int32 [K/8, N] (eight
  4-bit codes along K per word), ``qzeros`` int32 [K/128, N/8] (the GPTQ v1 zero point 8 − 1 = 7), ``scales``
  fp16 [K/128, N] and ``g_idx`` [K], from vLLM's own reference quantizer and packer; vLLM serves it with
  ``AutoGPTQLinearMethod`` through its CPU int4 kernel.
"""
from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from armor_vllm.format import INDEX_FILE, apply_umask, safetensors_files
from converters.conversion.methods.quantize import quantize_rows

DECODER_LINEAR = re.compile(r"^model\.layers\.\d+\..*_proj\.weight$")
GROUP = 128
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I8": 1, "U8": 1, "I32": 4, "I64": 8, "BOOL": 1}


def w8a8_config() -> dict:
    """compressed-tensors' ``quantization_config`` for its INT8_W8A8 preset, built by compressed-tensors itself."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.quant_scheme import INT8_W8A8

    cfg = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], **INT8_W8A8)},
                             format="int-quantized", ignore=["lm_head"],
                             quantization_status=QuantizationStatus.COMPRESSED)
    return cfg.model_dump(mode="json", exclude_none=True)


def gptq_config() -> dict:
    return {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "desc_act": False, "sym": True,
            "checkpoint_format": "gptq", "lm_head": False}


def w8a8_tensors(prefix: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """int8 codes and per-row scale of one weight [N, K] (the converter's rounding: scale = max |w| / 127)."""
    q = quantize_rows(w.float())
    return {prefix + "weight": q.codes, prefix + "weight_scale": q.scale[:, None].to(w.dtype)}


def gptq_tensors(prefix: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """GPTQ's four tensors of one weight [N, K] (uint4 with bias 8, group 128 along K)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import gptq_pack, gptq_quantize_weights
    from vllm.scalar_type import scalar_types

    n, k = w.shape
    _, codes, scales = gptq_quantize_weights(w.float().T.contiguous(), scalar_types.uint4b8, GROUP)
    zeros = torch.full((k // GROUP, n // 8), 0x77777777, dtype=torch.int32)  # eight 4-bit 7s per word
    return {prefix + "qweight": gptq_pack(codes, 4, k, n), prefix + "qzeros": zeros,
            prefix + "scales": scales.to(torch.float16), prefix + "g_idx": torch.arange(k, dtype=torch.int32) // GROUP}


def quantized_copy(src: Path, out: Path, qconfig: dict,
                   convert: Callable[[str, torch.Tensor], dict[str, torch.Tensor]]) -> Path:
    """``src`` with every decoder linear's weight replaced by ``convert(prefix, weight)``, shard by shard.

    Reused when ``out``'s config.json (written last, so it marks a complete directory) is the one this would write.
    """
    config = {**json.loads((src / "config.json").read_text()), "quantization_config": qconfig}
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text()) == config:
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    files = safetensors_files(src)
    weight_map, total = {}, 0
    for shard in sorted(set(files.values())):
        tensors = {}
        with safe_open(src / shard, framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                t = fh.get_tensor(name)
                tensors.update(convert(name[:-len("weight")], t) if DECODER_LINEAR.match(name) else {name: t})
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    apply_umask(out)  # safetensors writes 0600
    for f in src.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", INDEX_FILE):
            shutil.copy(f, out / f.name)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def write_w8a8(src: Path) -> Path:
    return quantized_copy(src, src.with_name(src.name + "-w8a8"), w8a8_config(), w8a8_tensors)


def write_w4a16(src: Path) -> Path:
    return quantized_copy(src, src.with_name(src.name + "-w4a16-gptq"), gptq_config(), gptq_tensors)


def int4_kernel_missing() -> str | None:
    """Why vLLM cannot run GPTQ/AWQ int4 on this CPU, or None.

    vLLM's ``CPUWNA16LinearKernel`` accepts such a layer on any x86 CPU and only at the first forward calls
    ``torch.ops._C.cpu_gemm_wna16``, which its wheel builds into the AVX-512 kernel libraries alone; where torch
    reports no AVX-512, vLLM loads ``_C_AVX2``, so this asks the library vLLM itself loads."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return None
    has = "AVX-512 but not that op" if torch.cpu._is_avx512_supported() else "no AVX-512"
    return f"vLLM's int4 CPU GEMM (`cpu_gemm_wna16`, GPTQ's and AWQ's) is built only with AVX-512; this CPU has {has}"


def linear_bytes_on_disk(model_dir: Path) -> int:
    """Bytes of the decoder-layer linears' tensors in a checkpoint, from the safetensors headers."""
    total = 0
    for name, shard in safetensors_files(model_dir).items():
        if re.match(r"^model\.layers\.\d+\..*_proj\.", name):
            with safe_open(model_dir / shard, framework="pt") as fh:
                sl = fh.get_slice(name)
                total += math.prod(sl.get_shape()) * DTYPE_BYTES[sl.get_dtype()]
    return total
