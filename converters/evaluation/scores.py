"""What every perplexity path returns, kept apart so that the backends import it, not each other."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int
    data: str
    backend: str
    seconds: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_sum(cls, total_nll: float, tokens: int, windows: int, seqlen: int, data: str, backend: str,
                 t0: float) -> "PerplexityResult":
        """The result of summed NLL over ``tokens`` predicted tokens, timed from ``t0`` (perf_counter)."""
        nll = total_nll / tokens
        return cls(math.exp(nll), nll, tokens, windows, seqlen, data, backend, time.perf_counter() - t0)
