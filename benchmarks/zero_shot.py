"""Zero-shot accuracy on the paper's tasks, dense vs ARMOR, through lm-eval:
`python -m benchmarks.zero_shot ARMOR_DIR [--dense DIR]` -> a table (and docs/results.md with --write-doc).

ARC-e, ARC-c, HellaSwag, PIQA, WinoGrande, BoolQ, RTE and OpenBookQA, as in the ARMOR paper: the
metric is acc_norm where lm-eval reports it (ARC, HellaSwag, PIQA, OpenBookQA), else acc. The
tasks' datasets live on the Hugging Face hub; where it cannot be reached (HF_HUB_OFFLINE=1, as
`make` sets, or no network) the command says so and exits 0 without a table. The perplexity
protocol (`armor-eval ppl`) is the offline measure.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

TASKS = {"arc_easy": "ARC-e", "arc_challenge": "ARC-c", "hellaswag": "HellaSwag", "piqa": "PIQA",
         "winogrande": "WinoGrande", "boolq": "BoolQ", "rte": "RTE", "openbookqa": "OpenBookQA"}
PROBE_DATASET = "allenai/ai2_arc"  # one of the tasks' datasets: if it answers, the hub is reachable


def hub_unreachable() -> str | None:
    """Why the tasks' datasets cannot be fetched, or None when the hub answers."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set (the Makefile sets it)"
    try:
        HfApi().dataset_info(PROBE_DATASET, timeout=10)
    except Exception as e:  # noqa: BLE001  (any failure means: no datasets)
        return f"the Hugging Face hub did not answer ({type(e).__name__}: {e})"
    return None


def accuracies(model_dir: Path, backend: str, limit: int | None, batch_size: str) -> dict[str, float]:
    """Task -> accuracy of one model directory (dense or ARMOR) through lm-eval."""
    import lm_eval

    import armor_vllm  # noqa: F401  (registers quant_method "armor" with transformers; vLLM loads it itself)

    model_args = {"pretrained": str(model_dir), "dtype": "float32"}
    if backend == "vllm":
        model_args |= {"max_model_len": 2048, "enforce_eager": True}
    out = lm_eval.simple_evaluate(model=backend, model_args=model_args, tasks=list(TASKS), limit=limit,
                                  batch_size=batch_size)
    return {t: r.get("acc_norm,none", r.get("acc,none")) for t, r in out["results"].items() if t in TASKS}


def table(dense: dict[str, float], armor: dict[str, float]) -> str:
    rows = ["| task | dense | ARMOR 2:4 |", "|---|---:|---:|"]
    rows += [f"| {TASKS[t]} | {100 * dense[t]:.1f} | {100 * armor[t]:.1f} |" for t in TASKS]
    mean = lambda acc: 100 * sum(acc[t] for t in TASKS) / len(TASKS)  # noqa: E731
    return "\n".join(rows + [f"| mean | {mean(dense):.1f} | {mean(armor):.1f} |"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("benchmarks.zero_shot", description=__doc__.splitlines()[0])
    p.add_argument("armor_dir", type=Path, help="an ARMOR checkpoint")
    p.add_argument("--dense", type=Path, help="its dense source (default: the embedded default model)")
    p.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--limit", type=int, help="examples per task (default: all)")
    p.add_argument("--batch-size", default="auto")
    p.add_argument("--write-doc", action="store_true", help="put the table into docs/results.md")
    a = p.parse_args(argv)

    why = hub_unreachable()
    if why:
        print(f"zero-shot benchmark skipped: its datasets ({', '.join(TASKS.values())}) come from the Hugging "
              f"Face hub, and {why}. On a machine with hub access: HF_HUB_OFFLINE=0 python -m benchmarks.zero_shot "
              f"{a.armor_dir}", file=sys.stderr)
        return
    from converters.commands.default_model import default_model_dir

    from .common import footer, write_section

    load = os.getloadavg()[0]
    t0 = time.time()
    dense = accuracies(a.dense or default_model_dir(), a.backend, a.limit, a.batch_size)
    armor = accuracies(a.armor_dir, a.backend, a.limit, a.batch_size)
    cmd = "python -m benchmarks.zero_shot " + " ".join(argv if argv is not None else sys.argv[1:])
    md = "\n".join([table(dense, armor), "", f"lm-eval {a.backend}, fp32, "
                    f"{'all examples' if a.limit is None else f'{a.limit} examples per task'}, "
                    f"{time.time() - t0:.0f} s.", *footer(load, cmd)])
    print(md)
    if a.write_doc:
        write_section(Path(__file__).parents[1] / "docs" / "results.md", "zero-shot", md)


if __name__ == "__main__":
    main()
