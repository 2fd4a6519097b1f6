"""Fixtures shared by the test modules (vLLM engines and tiny checkpoints; helpers in :mod:`tests.vllm_helpers`)."""
from __future__ import annotations

from functools import lru_cache

import pytest

from tests import tiny_models
from tests.vllm_helpers import EAGER, run_greedy


@pytest.fixture(scope="module")
def vllm_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_CACHE_ROOT", str(tmp_path_factory.mktemp("vllm-cache")))
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """tiny(model_type, **build_kwargs) -> TinyCheckpoint, each variant built once per module."""

    @lru_cache(maxsize=None)
    def build(model_type: str = "llama", **kw) -> tiny_models.TinyCheckpoint:
        return tiny_models.build(tmp_path_factory.mktemp(model_type), model_type, **kw)

    return build


@pytest.fixture(scope="module")
def dense_result(tiny):
    """dense_result(model_type, **build_kwargs): greedy generation of the dense twin (cached)."""
    return lru_cache(maxsize=None)(lambda model_type="llama", **kw: run_greedy(tiny(model_type, **kw).dense, **EAGER))
