"""One forward pass of the dense model, one decoder layer at a time, collecting input statistics.

Only one decoder layer is on the compute device at any moment; the activations between layers
stay in CPU memory (nsamples × seqlen × hidden values), so a model far larger than the device
converts. Per target linear we keep h_j = mean over tokens of x_j² (ARMOR, NoWag-P, Wanda) and,
when asked, XᵀX / tokens (SparseGPT). Statistics are written per decoder layer to disk.
"""
from __future__ import annotations

import torch
from torch import nn

from .methods import LayerStats
from .progress import progress


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


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    return obj


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, samples: torch.Tensor, device: str) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering decoder layer 0 (on CPU) and the kwargs the model passes to layers."""
    layers = decoder_layers(model)
    inputs, kwargs_seen = [], {}

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        inputs.append(hidden.detach().to("cpu", torch.float32))
        kwargs_seen.update({k: _to(v, "cpu") for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    for m in outer_modules(model):
        for p in m.parameters(recurse=False):
            if not p.is_meta:  # a streamed model leaves what the forward never reaches (lm_head) unread
                p.data = p.data.to(device)
        for name, b in m.named_buffers(recurse=False):
            setattr(m, name, b.to(device))
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for s in samples:
            try:
                model(s[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    kwargs_seen.pop("past_key_values", None)
    kwargs_seen.pop("past_key_value", None)
    kwargs_seen["use_cache"] = False
    return inputs, kwargs_seen


@torch.no_grad()
def collect_layer_stats(layer: nn.Module, inputs: list[torch.Tensor], layer_kwargs: dict, device: str,
                        need_xtx: bool) -> tuple[list[torch.Tensor], dict[str, LayerStats], list[list[str]]]:
    """Run one decoder layer over all inputs; return its outputs, per-linear stats, and input-sharing groups.

    Linears that receive the very same input tensor (q/k/v, gate/up) form a group; the converter
    can give such a group one shared B_in.
    """
    dtype = next(layer.parameters()).dtype
    layer.to(device, torch.float32)
    sums: dict[str, torch.Tensor] = {}
    xtx: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    first_input: dict[str, torch.Tensor] = {}  # holding references keeps identities unambiguous
    hooks = []

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
    for n in names:
        hooks.append(layer.get_submodule(n).register_forward_pre_hook(make_hook(n)))
    kw = {k: _to(v, device) for k, v in layer_kwargs.items()}
    outputs = []
    try:
        for x in inputs:
            out = layer(x.to(device), **kw)
            out = out[0] if isinstance(out, tuple) else out
            outputs.append(out.to("cpu", torch.float32))
    finally:
        for h in hooks:
            h.remove()
        layer.to("cpu", dtype)
    stats = {n: LayerStats(h=(sums[n] / tokens[n]).cpu(), xtx=(xtx[n] / tokens[n]).cpu() if need_xtx else None,
                           ntokens=tokens[n]) for n in names if n in tokens}
    groups: list[list[str]] = []
    for n in (n for n in names if n in first_input):
        same = next((g for g in groups if first_input[g[0]] is first_input[n]), None)
        same.append(n) if same is not None else groups.append([n])
    return outputs, stats, groups


def calibrate(model: nn.Module, samples: torch.Tensor, device: str, need_xtx: bool, save_layer,
              n_layers: int | None = None, loader=None) -> None:
    """Layer-by-layer pass over the first `n_layers` decoder layers (default all); `save_layer(index, stats,
    groups)` persists each one's statistics. A `loader` (converters.loader.LayerLoader) fills each layer's
    weights just before its turn and drops them after, so only one layer is ever in memory."""
    inputs, layer_kwargs = capture_layer_inputs(model, samples, device)
    if loader:
        loader.free_embeddings()
    n_layers = len(decoder_layers(model)) if n_layers is None else n_layers
    for i in progress(range(n_layers), desc="calibration", unit="layer"):
        layer = loader.load_layer(i) if loader else decoder_layers(model)[i]
        inputs, stats, groups = collect_layer_stats(layer, inputs, layer_kwargs, device, need_xtx)
        if loader:
            loader.free_layer(i)
        for n, s in stats.items():
            if not torch.isfinite(s.h).all() or (s.xtx is not None and not torch.isfinite(s.xtx).all()):
                raise FloatingPointError(f"calibration statistics of layer {i} '{n}' contain NaN/Inf "
                                         "(the dense model overflows on the calibration text; try fp32)")
        save_layer(i, stats, groups)
