"""Progress display: tqdm bars on a terminal, one plain line per finished item in a log.

tqdm redraws its bar with carriage returns; in a file (CI, `make demo > log`) every redraw becomes
text, thousands of lines for one conversion. When stderr is not a terminal, `progress` prints one
line per finished item instead (with the count and the elapsed time) and drops inner bars
(per-iteration ones) entirely.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm


def interactive() -> bool:
    return sys.stderr.isatty()


class _Lines:
    """The log-file stand-in for tqdm: `update` prints one line, `inner` bars print nothing."""

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, initial: int, silent: bool):
        self.iterable, self.desc, self.silent = iterable, desc.strip(), silent
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.t0 = initial, time.perf_counter()

    def update(self, n: int = 1, note: str = "") -> None:
        self.n += n
        if not self.silent:
            of = f"/{self.total}" if self.total is not None else ""
            print(f"{self.desc} {self.n}{of} ({time.perf_counter() - self.t0:.0f} s)" + (f": {note}" if note else ""),
                  file=sys.stderr, flush=True)

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Bar(tqdm):
    """tqdm whose `update` also takes the per-item note the line mode prints."""

    def update(self, n: int = 1, note: str = "") -> None:
        if note:
            self.write(note)
        super().update(n)


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None, unit: str = "it",
             initial: int = 0, inner: bool = False):
    """A progress bar over `iterable` (or updated by hand with `update(n, note)`).

    inner=True marks a bar nested in another one (solver iterations): on a terminal it is a
    transient bar, in a log it prints nothing.
    """
    if interactive():
        return _Bar(iterable, desc=desc, total=total, unit=unit, initial=initial, leave=not inner)
    return _Lines(iterable, desc, total, initial, silent=inner)


def quiet_library_bars() -> None:
    """In a log, also silence the bars transformers draws while loading a model."""
    if not interactive():
        from transformers.utils import logging

        logging.disable_progress_bar()
