"""Data and scoring of the lm-eval task ``armor_wiki_ppl`` (armor_wiki_ppl.yaml)."""
from __future__ import annotations

import datasets
from transformers import AutoTokenizer

from converters.data import load_text, tokenize, windows


def load(pretrained: str, data: str = "wiki-test", seqlen: int = 2048, max_windows: int | None = None,
         **_) -> datasets.DatasetDict:
    """armor-eval's windows of ``data`` as text documents, with the token count each is scored on."""
    tok = AutoTokenizer.from_pretrained(pretrained)
    docs = [tok.decode(w) for w in windows(tokenize(tok, load_text(data)), int(seqlen), max_windows)]
    n_tokens = [len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": docs, "n_tokens": n_tokens})})


def process_results(doc: dict, results: list[float]) -> dict:
    (loglikelihood,) = results
    return {"token_perplexity": (loglikelihood, doc["n_tokens"])}
