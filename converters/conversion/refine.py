"""Block-wise reconstruction: tune a compressed decoder layer so that its output matches the dense layer's.

Each linear's solve fits its own proxy loss; their errors then meet in attention's softmax, the gated
MLP and the residual stream, where no proxy sees them. After a layer's solves this stage tunes the
continuous parts of every compressed linear of the layer (S's kept values, B_in and B_out; the 2:4
masks stay fixed) with Adam on ‖layer_c(x) − y‖² over the calibration samples (EBFT, arXiv
2402.12419; Shin et al., arXiv 2406.15524). Which x and y (the dense model's, or the compressed
model's so far) is the pipeline's choice; this module only sees tensors and one layer.

A slice of the calibration samples is held back: the tuned state is kept only where it lowers the
held-back loss (no test-set selection), else the solves' result stands. Deterministic for a seed.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from armor_vllm.format import block_diag_left, block_diag_right, unpack_mask

from .activations import Activations
from .calibration import to_device
from .methods.base import check_positive, option_error

MODES = ("none", "block")
INPUTS = ("dense", "sequential", "mixed")
PARAMS = ("blocks", "blocks+values")


@dataclass(frozen=True)
class RefineOptions:
    """``--refine`` and its settings; ``inputs``: where each layer's samples come from (see pipeline)."""

    mode: str = "none"
    steps: int = 32                  # Adam steps per decoder layer
    lr: float = 3e-3                 # relative: each tensor's step is lr × its RMS
    batch: int = 4                   # calibration samples per step
    holdout: int | None = None       # samples held back to judge the tuned state (None: 1/8 of them, ≥ 1)
    inputs: str = "dense"
    params: str = "blocks+values"

    def __post_init__(self):
        for name, allowed in (("mode", MODES), ("inputs", INPUTS), ("params", PARAMS)):
            if getattr(self, name) not in allowed:
                raise option_error(f"refine_{name}" if name != "mode" else "refine", getattr(self, name),
                                   f"one of {', '.join(allowed)}")
        for name in ("steps", "batch", "holdout"):
            if name == "holdout" and self.holdout is None:
                continue
            try:
                check_positive(self, name)
            except ValueError:
                raise option_error(f"refine_{name}", getattr(self, name), "a positive integer") from None
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise option_error("refine_lr", self.lr, "a positive learning rate")

    @property
    def on(self) -> bool:
        return self.mode != "none"

    def for_samples(self, nsamples: int) -> "RefineOptions":
        """These options with the holdout resolved for ``nsamples`` calibration samples (64 -> 8), so that a
        preset that refines also runs with few samples."""
        return self if self.holdout is not None else dataclasses.replace(self, holdout=max(1, nsamples // 8))


class TunableLinear(nn.Module):
    """A compressed linear with its continuous parts as parameters: W = blockdiag(b_out) · S · blockdiag(b_in),
    S built from ``values`` at the fixed kept positions. ``b_in`` may be a parameter shared with the other
    linears of a job (shared input transform). Int8 kept values (W8A16) stay integers: their per-row
    ``scale`` is tuned in their place."""

    def __init__(self, part: dict, bias: torch.Tensor | None, b_in: nn.Parameter | None, tune_values: bool):
        super().__init__()
        self.n, self.k = part["values"].shape[0], part["bitmask"].shape[1] * 8
        self.bitmask, self.int_values = part["bitmask"], part.get("scale") is not None
        self.register_buffer("mask", unpack_mask(part["bitmask"], self.k), persistent=False)
        if self.int_values:
            self.register_buffer("q", part["values"].float(), persistent=False)
            self.scale_shape = part["scale"].shape
            self.scale = nn.Parameter(part["scale"].float().reshape(-1, 1).clone(), requires_grad=tune_values)
            self.values = None
        else:
            self.values = nn.Parameter(part["values"].float().clone(), requires_grad=tune_values)
            self.scale = None
        self.b_in = b_in
        self.b_out = None if part["b_out"] is None else nn.Parameter(part["b_out"].float().clone())
        self.bias = bias
        self.dtypes = {k: part[k].dtype for k in ("values", "b_out", "scale") if part.get(k) is not None}

    def tunables(self) -> list[nn.Parameter]:
        return [p for p in (self.values, self.scale, self.b_in, self.b_out) if p is not None and p.requires_grad]

    def weight(self) -> torch.Tensor:
        kept = self.q * self.scale if self.int_values else self.values
        w = torch.zeros(self.n, self.k, device=kept.device).masked_scatter(self.mask, kept)
        if self.b_in is not None:
            w = block_diag_right(w, self.b_in)
        return w if self.b_out is None else block_diag_left(self.b_out, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight(), self.bias)

    def part(self) -> dict:
        """Back to the solves' layout and dtypes (values, bitmask, b_in, b_out, scale), on the CPU."""
        def out(t, key):
            return None if t is None else t.detach().cpu().to(self.dtypes.get(key, torch.float32)).clone()
        part = {"values": self.q.cpu().to(torch.int8) if self.int_values else out(self.values, "values"),
                "bitmask": self.bitmask, "b_in": out(self.b_in, "b_out"), "b_out": out(self.b_out, "b_out"), "scale": None}
        if self.int_values:
            # bf16-exact, as quantize_rows makes it: every model dtype then serves what was tuned
            part["scale"] = out(self.scale, "scale").to(torch.bfloat16).to(self.dtypes["scale"]).reshape(self.scale_shape)
        return part


def tunable_layer(layer: nn.Module, prefix: str, results: list[dict], opts: RefineOptions) -> tuple[nn.Module, list]:
    """A copy of the dense decoder layer whose compressed linears are ``TunableLinear``s; returns it and
    [(job result, [its TunableLinears])] to read the tuned parts back."""
    tuned = copy.deepcopy(layer).float()
    for p in tuned.parameters():
        p.requires_grad_(False)
    jobs = []
    for saved in results:
        shared = None
        if len(saved["names"]) > 1 and saved["parts"][0]["b_in"] is not None:  # one B_in for the whole job
            shared = nn.Parameter(saved["parts"][0]["b_in"].float().clone())
        mods = []
        for name, part in zip(saved["names"], saved["parts"]):
            path = name.removeprefix(prefix)
            old = tuned.get_submodule(path)
            b_in = shared if shared is not None else (None if part["b_in"] is None else nn.Parameter(part["b_in"].float().clone()))
            mod = TunableLinear(part, old.bias, b_in, tune_values=opts.params == "blocks+values")
            parent, _, attr = path.rpartition(".")
            setattr(tuned.get_submodule(parent) if parent else tuned, attr, mod)
            mods.append(mod)
        jobs.append((saved, mods))
    return tuned, jobs


def _param_groups(jobs: list, lr: float) -> list[dict]:
    """One group per tensor with lr scaled by the tensor's RMS: blocks and values differ in scale by 10×."""
    seen, groups = set(), []
    for _, mods in jobs:
        for m in mods:
            for p in m.tunables():
                if id(p) not in seen:
                    seen.add(id(p))
                    groups.append({"params": [p], "lr": lr * float(p.detach().square().mean().sqrt().clamp_min(1e-8))})
    return groups


def _batch(buf: Activations, idx: list[int], device: str) -> torch.Tensor:
    return torch.cat([buf[i].to(device, torch.float32) for i in idx])


def _out(layer: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(x, **kw)
    return out[0] if isinstance(out, tuple) else out


def refine_layer(layer: nn.Module, prefix: str, results: list[dict], inputs: Activations, targets: Activations,
                 layer_kwargs: dict, opts: RefineOptions, seed: int, device: str = "cpu") -> tuple[list[dict], dict]:
    """Tune the compressed linears of one decoder layer (the dense ``layer`` with ``results``, the solves of its
    linears, {"names", "parts"} each) so that it maps ``inputs`` to ``targets``; returns the results with tuned
    parts and a record of the relative output error ‖out − y‖² / ‖y − x‖² on the held-back samples."""
    t0 = time.perf_counter()
    n = len(inputs)
    hold = min(opts.holdout, n - 1)
    train, held = list(range(n - hold)), list(range(n - hold, n))
    gen = torch.Generator().manual_seed(seed)
    tuned, jobs = tunable_layer(layer, prefix, results, opts)
    tuned.to(device)
    kw = {k: to_device(v, device) for k, v in layer_kwargs.items()}

    @torch.no_grad()
    def held_error() -> float:
        err = ref = 0.0
        for i in held:
            x, y = _batch(inputs, [i], device), _batch(targets, [i], device)
            err += float((_out(tuned, x, kw) - y).square().sum(dtype=torch.float64))
            ref += float((y - x).square().sum(dtype=torch.float64))
        return err / max(ref, 1e-300)

    def snapshot() -> list[list[dict]]:
        return [[m.part() for m in mods] for _, mods in jobs]

    start = held_error()
    best = (start, None, 0)
    opt = torch.optim.Adam(_param_groups(jobs, opts.lr), betas=(0.9, 0.95))
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    per_epoch = max(1, len(train) // opts.batch)
    order: list[int] = []
    train_losses = []
    for step in range(1, opts.steps + 1):
        if len(order) < opts.batch:
            order += torch.randperm(len(train), generator=gen).tolist()
        idx, order = [train[j] for j in order[:opts.batch]], order[opts.batch:]
        x, y = _batch(inputs, idx, device), _batch(targets, idx, device)
        for g in opt.param_groups:  # linear decay to zero
            g["lr"] = g["initial_lr"] * (1 - (step - 1) / opts.steps)
        opt.zero_grad(set_to_none=True)
        loss = (_out(tuned, x, kw) - y).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        train_losses.append(float(loss.detach()))
        if step % per_epoch == 0 or step == opts.steps:
            err = held_error()
            if err < best[0]:
                best = (err, snapshot(), step)
    end, parts, best_step = best
    tuned_results = results if parts is None else [
        {**saved, "parts": p} for (saved, _), p in zip(jobs, parts)]
    record = {"held_error_start": start, "held_error_end": end, "best_step": best_step, "steps": opts.steps,
              "train_mse_first": train_losses[0] if train_losses else None,
              "train_mse_last": train_losses[-1] if train_losses else None,
              "seconds": time.perf_counter() - t0}
    return tuned_results, record
