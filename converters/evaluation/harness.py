"""lm-evaluation-harness with ARMOR loaded: ``python -m converters.evaluation.harness`` takes ``lm_eval``'s arguments.

vLLM loads the ARMOR plugin by itself, so ``lm_eval --model vllm`` works as it is; this entry point
also serves ``--model hf`` (it imports :mod:`armor_vllm` first, which registers the transformers
quantizer) and puts the project's offline tasks (``armor_wiki_ppl``) on the task path.
"""
from __future__ import annotations

import sys
from pathlib import Path

import armor_vllm  # noqa: F401  (registers quant_method "armor" with transformers)

TASKS_DIR = Path(__file__).with_name("lm_eval_tasks")


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    args = sys.argv[1:] if argv is None else argv
    sys.argv = ["lm_eval", *args, *([] if "--include_path" in args else ["--include_path", str(TASKS_DIR)])]
    cli_evaluate()


if __name__ == "__main__":
    main()
