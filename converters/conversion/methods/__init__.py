"""Compression methods, one file each, registered by name in :mod:`.base`'s ``METHODS``.

Importing this package imports every method module, so the registry is complete.
"""
from . import armor, magnitude, nowag, sparsegpt, wanda  # noqa: F401  (each registers itself)
from .base import (METHODS, CompressedLayer, LayerStats, MethodOptions, Progress, get_method, make_options,
                   method_spec, register_method)

__all__ = ["METHODS", "CompressedLayer", "LayerStats", "MethodOptions", "Progress", "get_method", "make_options",
           "method_spec", "register_method"]
