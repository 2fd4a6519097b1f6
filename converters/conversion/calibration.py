"""The calibration forward pass, one decoder layer at a time, and the input statistics it collects.

Only one decoder layer is on the compute device at any moment; the activations between layers
stay on the host (``converters.conversion.activations``: RAM or a spill file), so a model far larger than the
device converts. Per target linear we keep h_j = mean over tokens of x_j² (ARMOR, NoWag-P, Wanda)
and, when asked, XᵀX / tokens (SparseGPT). ``converters.conversion.pipeline`` drives the pass layer by layer.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .activations import Activations
from .methods import LayerStats


class _StopForward(Exception):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a HF causal LM (Llama, Qwen2, Qwen3, Mistral...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for _, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and len(mod) > 0:
            return mod
    raise ValueError(f"{type(model).__name__}: found no decoder layer list of length num_hidden_layers={n}")


def decoder_layer_names(model: nn.Module) -> list[str]:
    """Module names of the decoder layers, in order ("model.layers.0", ...)."""
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(layer)] for layer in decoder_layers(model)]


def outer_modules(model: nn.Module) -> list[nn.Module]:
    """Modules outside the decoder stack (embeddings, rotary, final norm): small, so they go to the device
    for the whole pass; the decoder layers' submodules stay put until their layer's turn."""
    layers = decoder_layers(model)
    inside = {id(sub) for layer in layers for sub in layer.modules()}
    return [m for m in model.modules() if id(m) not in inside and not any(l in m.modules() for l in layers)]


def to_device(obj, device):
    """A tensor, or the tensors of a tuple (position embeddings), moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    return obj


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, samples: torch.Tensor, device: str,
                         new_buffer: Callable[[tuple[int, ...]], Activations]) -> tuple[Activations, dict]:
    """Hidden states entering decoder layer 0 (in a buffer from ``new_buffer(shape)``) and the kwargs the
    model passes to its layers."""
    layers = decoder_layers(model)
    caught: list[torch.Tensor] = []
    kwargs_seen: dict = {}

    def hook(_mod, args, kwargs):
        caught.append(args[0] if args else kwargs["hidden_states"])
        kwargs_seen.update({k: to_device(v, "cpu") for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    for m in outer_modules(model):
        for p in m.parameters(recurse=False):
            if not p.is_meta:  # a streamed model leaves what the forward never reaches (lm_head) unread
                p.data = p.data.to(device)
        for name, b in m.named_buffers(recurse=False):
            setattr(m, name, b.to(device))
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    inputs = None
    try:
        for i, s in enumerate(samples):
            try:
                model(s[None].to(device), use_cache=False)
            except _StopForward:
                hidden = caught.pop()
                if inputs is None:
                    inputs = new_buffer(tuple(hidden.shape))
                inputs[i] = hidden
    finally:
        handle.remove()
    kwargs_seen.pop("past_key_values", None)
    kwargs_seen.pop("past_key_value", None)
    kwargs_seen["use_cache"] = False
    return inputs, kwargs_seen


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: Activations, layer_kwargs: dict, device: str,
              outputs: Activations | None) -> None:
    """One decoder layer over every sample, in fp32 on ``device``; fills ``outputs`` when given."""
    dtype = next(layer.parameters()).dtype
    layer.to(device, torch.float32)
    kw = {k: to_device(v, device) for k, v in layer_kwargs.items()}
    try:
        for i in range(len(inputs)):
            out = layer(inputs[i].to(device, torch.float32), **kw)
            if outputs is not None:
                outputs[i] = out[0] if isinstance(out, tuple) else out
    finally:
        layer.to("cpu", dtype)


@torch.no_grad()
def collect_layer_stats(layer: nn.Module, inputs: Activations, layer_kwargs: dict, device: str, need_xtx: bool,
                        outputs: Activations | None = None) -> tuple[dict[str, LayerStats], list[list[str]]]:
    """Per-linear input statistics of one decoder layer, and its input-sharing groups (``outputs`` filled
    on the way when given).

    Linears that receive the very same input tensor (q/k/v, gate/up) form a group; the converter
    can give such a group one shared B_in.
    """
    sums: dict[str, torch.Tensor] = {}
    xtx: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    first_input: dict[str, torch.Tensor] = {}  # holding references keeps identities unambiguous

    def make_hook(name):
        def hook(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            first_input.setdefault(name, args[0])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            if need_xtx:
                xtx[name] = xtx.get(name, 0) + x.T @ x
            tokens[name] = tokens.get(name, 0) + x.shape[0]
        return hook

    names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
    hooks = [layer.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        run_layer(layer, inputs, layer_kwargs, device, outputs)
    finally:
        for h in hooks:
            h.remove()
    stats = {n: LayerStats(h=(sums[n] / tokens[n]).cpu(), xtx=(xtx[n] / tokens[n]).cpu() if need_xtx else None,
                           ntokens=tokens[n]) for n in names if n in tokens}
    for n, s in stats.items():
        if not torch.isfinite(s.h).all() or (s.xtx is not None and not torch.isfinite(s.xtx).all()):
            raise FloatingPointError(f"calibration statistics of '{n}' contain NaN/Inf "
                                     "(the dense model overflows on the calibration text; try fp32)")
    groups: list[list[str]] = []
    for n in (n for n in names if n in first_input):
        same = next((g for g in groups if first_input[g[0]] is first_input[n]), None)
        same.append(n) if same is not None else groups.append([n])
    return stats, groups
