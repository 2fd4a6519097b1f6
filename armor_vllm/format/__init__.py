"""ARMOR checkpoint format v2: the one package that knows tensor names (docs/format.md).

Both halves import it: the converter writes with :func:`write_checkpoint`, the vLLM plugin and
``armor-eval`` read with :func:`read_checkpoint`, and everyone validates with the same rules.
Each compressed linear ``<prefix>`` stores W = blockdiag(b_out) · S · blockdiag(b_in), with S
2:4 sparse along the input dimension, packed as kept values (model dtype, or int8 with a per-row
``weight_scale``: W8A16) plus a bitmask.

- ``schema``: ``quantization_config`` and the format's constants;
- ``tensors``: 2:4 packing and block-diagonal math (pure functions);
- ``validate``: the rules one compressed linear must satisfy;
- ``io``: checkpoint directories (reader, atomic writer).

It must stay importable without vLLM.
"""
from .io import (ArmorCheckpoint, CheckpointWriter, apply_umask, config_dtype, layer_tensors, packed_layer_tensors, read_checkpoint,
                 read_tensors, safetensors_files, weight_bytes, write_checkpoint)
from .schema import (COLUMN_PARALLEL, FORMAT_VERSION, FUSED_SHARDS, INDEX_FILE, MAX_SHARD_BYTES, METHODS, QUANT_METHOD,
                     ROW_PARALLEL, SCHEMES, SUFFIXES, ArmorFormatError, ArmorQuantizationConfig, CalibrationRecord,
                     QuantizationArgs, QuantizationScheme, overhead_ratio, rank_width_problems, valid_block_sizes)
from .tensors import (block_diag_left, block_diag_right, dequantize, mask_24, pack_24, pack_bits, reconstruct, unpack_24,
                      unpack_mask)
from .validate import compressed_prefixes, validate_layer

__all__ = ["ArmorCheckpoint", "CheckpointWriter", "apply_umask", "config_dtype", "layer_tensors",
           "packed_layer_tensors", "read_checkpoint", "read_tensors", "safetensors_files", "weight_bytes",
           "write_checkpoint", "COLUMN_PARALLEL", "FORMAT_VERSION", "FUSED_SHARDS", "ROW_PARALLEL", "INDEX_FILE",
           "MAX_SHARD_BYTES", "METHODS", "QUANT_METHOD", "SCHEMES", "SUFFIXES", "ArmorFormatError",
           "ArmorQuantizationConfig", "CalibrationRecord", "QuantizationArgs", "QuantizationScheme",
           "overhead_ratio", "rank_width_problems", "valid_block_sizes", "block_diag_left", "block_diag_right",
           "dequantize", "mask_24", "pack_24", "pack_bits", "reconstruct", "unpack_24", "unpack_mask",
           "compressed_prefixes", "validate_layer"]
