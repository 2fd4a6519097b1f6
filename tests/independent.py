"""Plain-torch references for what the converter writes, sharing no code with it or with the kernels.

A test that rebuilds its expected values through the code under test cannot fail; these few lines
restate the format (docs/format.md) and the proxy loss (shared/notes/armor-method.md) from their
definitions, in float64: W_eff = blockdiag(b_out) · S · blockdiag(b_in) from a checkpoint's raw
tensors, the NoWag-normalised loss weighted by h = mean of x_j² over calibration tokens, NoWag-P's
loss (ARMOR's starting point) and h itself, measured by hooks on a transformers forward pass.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

EPS = 1e-5  # NoWag's epsilon on column and row norms


def raw_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors files, as stored."""
    return {nm: t for f in sorted(Path(model_dir).glob("*.safetensors")) for nm, t in load_file(f).items()}


def compressed_prefixes(raw: dict[str, torch.Tensor]) -> list[str]:
    return sorted(nm.removesuffix(".weight_values") for nm in raw if nm.endswith(".weight_values"))


def effective_weight(raw: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """W_eff [N, K] in float64: bit j%8 of byte [i, j//8] keeps S[i, j]; values fill kept places row by row,
    int8 values times their row's weight_scale (W8A16)."""
    values, bits = raw[f"{prefix}.weight_values"].double(), raw[f"{prefix}.weight_bitmask"]
    if f"{prefix}.weight_scale" in raw:
        values = values * raw[f"{prefix}.weight_scale"].double()
    n, k = bits.shape[0], bits.shape[1] * 8
    keep = ((bits[..., None].int() >> torch.arange(8)) & 1).bool().reshape(n, k)
    s = torch.zeros(n, k, dtype=torch.float64)
    s[keep] = values.reshape(-1)
    if f"{prefix}.b_in" in raw:
        s = torch.block_diag(*raw[f"{prefix}.b_out"].double()) @ s @ torch.block_diag(*raw[f"{prefix}.b_in"].double())
    return s


def dense_state_dict(model_dir: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A plain HF state dict of a checkpoint: every compressed linear replaced by ``<prefix>.weight`` = W_eff."""
    raw = raw_tensors(model_dir)
    stored = (".weight_values", ".weight_bitmask", ".weight_scale", ".b_in", ".b_out")
    sd = {nm: t for nm, t in raw.items() if not nm.endswith(stored)}
    sd.update({f"{p}.weight": effective_weight(raw, p).to(dtype) for p in compressed_prefixes(raw)})
    return sd


def dense_model(model_dir: Path):
    """The plain transformers model an ARMOR checkpoint stands for: its config without quantization_config,
    every compressed linear holding W_eff (lm_head may stay tied to the embeddings)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(dense_state_dict(model_dir), strict=False)
    assert not unexpected and set(missing) <= set(model.all_tied_weights_keys), (missing, unexpected)
    return model


def normalize(w: torch.Tensor) -> torch.Tensor:
    """(r, c): column norms c_j = |W_:j| + eps, then row norms of W diag(c)^-1, + eps."""
    w = w.double()
    c = w.norm(dim=0) + EPS
    return (w / c).norm(dim=1) + EPS, c


def proxy_loss(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """sum_ij (Wbar - What_bar)_ij² h_j / sum_ij Wbar_ij² h_j, both in W's normalised coordinates."""
    r, c = normalize(w)
    wbar, hat = w.double() / r[:, None] / c, w_hat.double() / r[:, None] / c
    h = h.double()
    return float(((wbar - hat).square() * h).sum() / (wbar.square() * h).sum())


def nowag_p_loss(w: torch.Tensor, h: torch.Tensor) -> float:
    """The loss of NoWag-P: keep the 2 largest Wbar_ij² h_j of every 4 along K, values untouched."""
    r, c = normalize(w)
    score = (w.double() / r[:, None] / c).square() * h.double()
    groups = score.reshape(-1, 4)
    pruned = groups.sum() - groups.topk(2, dim=-1).values.sum()
    return float(pruned / score.sum())


@torch.no_grad()
def input_h(model: torch.nn.Module, samples: torch.Tensor) -> dict[str, torch.Tensor]:
    """h of every nn.Linear of a transformers model: mean over all tokens of x_j², accumulated in float64."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(_mod, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        model(samples, use_cache=False)
    finally:
        for hd in handles:
            hd.remove()
    return {n: sums[n] / counts[n] for n in sums}
