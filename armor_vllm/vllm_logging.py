"""Keep vLLM's load log readable for ARMOR checkpoints.

vLLM warns once per tensor when a checkpoint's dtype differs from the model's: an fp32 ARMOR
checkpoint served in bf16 printed 242 such lines at start-up. The first line per dtype pair stays,
saying how to avoid the cast; the rest are dropped.
"""
from __future__ import annotations

import logging

CAST_LOGGER = "vllm.model_executor.models.utils"
CAST_MESSAGE = "Attempted to load weight %s with dtype %s into parameter with dtype %s"


class OneCastWarningPerDtype(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != CAST_MESSAGE:
            return True
        pair = (str(record.args[1]), str(record.args[2]))
        if pair in self.seen:
            return False
        self.seen.add(pair)
        record.msg = CAST_MESSAGE + "; further %s -> %s casts are not logged (serve with --dtype %s to avoid them)"
        record.args = (*record.args, *pair, pair[0].removeprefix("torch."))
        return True


def install() -> None:
    """Add the filter once per process (idempotent: each process that loads an ARMOR checkpoint calls it)."""
    log = logging.getLogger(CAST_LOGGER)
    if not any(isinstance(f, OneCastWarningPerDtype) for f in log.filters):
        log.addFilter(OneCastWarningPerDtype())
