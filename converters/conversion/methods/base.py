"""What every method shares: the statistics it reads, the result it returns, typed options, the registry.

A method is ``fn(W, stats, options, progress=None) -> CompressedLayer`` returning a 2:4 sparse core S
and optional block-diagonal transforms with W ~ blockdiag(b_out) S blockdiag(b_in), so the converter
and the checkpoint writer treat all methods alike. Each method declares its own options dataclass,
validated on construction, so an option it does not take is an error instead of being ignored.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class LayerStats:
    """Calibration statistics of one linear's input x."""

    h: torch.Tensor                  # [K] fp32, mean over tokens of x_j^2
    xtx: Optional[torch.Tensor]      # [K,K] fp32, mean over tokens of x x^T (only when a method needs it)
    ntokens: int


@dataclass
class CompressedLayer:
    """Result of one method on one linear: W ~ blockdiag(b_out) @ weight @ blockdiag(b_in)."""

    weight: torch.Tensor             # [N,K] fp32 dense tensor holding the 2:4 sparse core S
    b_in: Optional[torch.Tensor]     # [K/b,b,b] (None for baselines)
    b_out: Optional[torch.Tensor]    # [N/b,b,b]
    loss_start: float                # relative proxy loss of the initial state (NoWag-P for armor)
    loss_end: float
    iters: int
    history: list[float]             # relative proxy loss per iteration (armor); [] for one-shot methods


def option_error(name: str, value, expected: str) -> ValueError:
    """An error naming the option as the command line spells it."""
    return ValueError(f"--{name.replace('_', '-')} {value}: expected {expected}")


def check_positive(opts, *names: str, multiple_of: int = 1) -> None:
    for name in names:
        v = getattr(opts, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % multiple_of:
            raise option_error(name, v, "a positive integer" + (f" multiple of {multiple_of}" if multiple_of > 1 else ""))


@dataclass(frozen=True)
class MethodOptions:
    """Options of a method without any: only the seed, which the driver derives per job."""

    seed: int = 0


Progress = Callable[[int, float], None]
Method = Callable[[torch.Tensor, LayerStats, MethodOptions, Optional[Progress]], CompressedLayer]


@dataclass(frozen=True)
class MethodSpec:
    fn: Method
    options: type[MethodOptions]
    needs_xtx: bool                  # reads the full input Gram matrix (SparseGPT), not only its diagonal
    calibration: str = "dense"       # default statistics: of the dense model, or "sequential" (of the compressed one)


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, options: type[MethodOptions] = MethodOptions, needs_xtx: bool = False,
                    calibration: str = "dense") -> Callable[[Method], Method]:
    """Decorator adding a method to METHODS under ``name`` (names must be unique)."""

    def deco(fn: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = MethodSpec(fn, options, needs_xtx, calibration)
        return fn

    return deco


def method_spec(name: str) -> MethodSpec:
    """Look a method up by name; the error lists the valid names so a typo is easy to fix."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}") from None


def get_method(name: str) -> Method:
    return method_spec(name).fn


def make_options(name: str, **values) -> MethodOptions:
    """The options of method ``name``; an option it does not take is refused, naming the ones it does."""
    cls = method_spec(name).options
    fields = {f.name for f in dataclasses.fields(cls)}
    extra = sorted(set(values) - fields)
    if extra:
        takes = ", ".join("--" + f.replace("_", "-") for f in sorted(fields - {"seed"})) or "no options"
        raise ValueError(f"--method {name} does not take {', '.join('--' + e.replace('_', '-') for e in extra)} "
                         f"(it takes {takes})")
    return cls(**values)
