"""``torch.ops.armor.*``: the ARMOR kernels as opaque custom ops with fake (meta) kernels.

vLLM compiles the model with ``fullgraph=True``; registering the kernels as custom ops keeps
Dynamo from tracing into them (the sparse tensor subclass in particular), while the fake
kernels give it output shapes.
"""
from __future__ import annotations

import torch

from armor_vllm.kernels.sandwich import sandwich_linear
from armor_vllm.kernels.semi_structured import semi_structured_linear


@torch.library.custom_op("armor::sandwich", mutates_args=())
def sandwich(x: torch.Tensor, s: torch.Tensor, b_in: torch.Tensor | None, b_out: torch.Tensor | None,
             bias: torch.Tensor | None, shard_sizes: list[int]) -> torch.Tensor:
    return sandwich_linear(x, s, b_in, b_out, bias, shard_sizes)


@sandwich.register_fake
def _(x, s, b_in, b_out, bias, shard_sizes):
    return x.new_empty((*x.shape[:-1], s.shape[0]))


@torch.library.custom_op("armor::semi_structured", mutates_args=())
def semi_structured(x: torch.Tensor, packed: list[torch.Tensor], meta: list[torch.Tensor],
                    b_in: torch.Tensor | None, b_out: torch.Tensor | None, bias: torch.Tensor | None,
                    shard_sizes: list[int], cutlass: bool) -> torch.Tensor:
    return semi_structured_linear(x, packed, meta, b_in, b_out, bias, shard_sizes, cutlass)


@semi_structured.register_fake
def _(x, packed, meta, b_in, b_out, bias, shard_sizes, cutlass):
    return x.new_empty((*x.shape[:-1], sum(shard_sizes)))


def load_sparse_cpu_library(level: str, path: str) -> None:
    """Load one ISA level of the 2:4 CPU kernel (``torch.ops.armor_<level>.linear``) and give it a fake kernel.

    The native op is called directly from ``apply`` (no Python op wrapper in the decode path);
    the fake kernel lets vLLM's compiled mode trace it.
    """
    torch.ops.load_library(path)
    torch.library.register_fake(f"armor_{level}::linear")(_linear_fake)


def _linear_fake(x, values, bitmask, b_in, b_out, bias, shard_sizes, prefill_min_tokens, scale=None):
    return x.new_empty((*x.shape[:-1], values.shape[0]))
