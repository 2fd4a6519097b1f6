"""armor_report.json (per layer: method, block size, proxy loss at start and end, with --scheme W8A16 also
right after rounding the kept values and after re-solving the blocks, iterations, seconds; the tensor-parallel
sizes vLLM loads the checkpoint with) and a loss-curve PNG, written into the checkpoint directory."""
from __future__ import annotations

import json
from pathlib import Path

REPORT_FILE = "armor_report.json"
CURVE_FILE = "loss_curve.png"


def write(dst: Path, summary: dict) -> None:
    layers = summary["layers"]
    means = {f"mean_{k}": sum(r[k] for r in layers) / len(layers)
             for k in ("loss_start", "loss_end", "loss_quant_start", "loss_quant_end") if k in layers[0]}
    summary = dict(summary, **means)
    slim = dict(summary, layers=[{k: v for k, v in r.items() if k != "history"} for r in layers])
    (dst / REPORT_FILE).write_text(json.dumps(slim, indent=2))
    curves = [r["history"] for r in layers if r["history"]]
    if curves or summary.get("refinement"):
        plot(curves, dst / CURVE_FILE, f"{summary['method']}: relative proxy loss per layer", summary.get("refinement"))


def tensor_parallel_fields(refusals: dict[int, str | None]) -> dict:
    """The report's record of checks.tensor_parallel_refusals: the sizes that load, and why not the others."""
    return {"tensor_parallel_sizes": [tp for tp, why in refusals.items() if why is None],
            "tensor_parallel_refused": {str(tp): why for tp, why in refusals.items() if why is not None}}


def tensor_parallel_line(refusals: dict[int, str | None]) -> str:
    """One line for the end of a run; of the refused sizes it explains the smallest power of two (the usual
    choices), or else the smallest."""
    loads = [str(tp) for tp, why in refusals.items() if why is None]
    line = f"vLLM loads this checkpoint with --tensor-parallel-size {', '.join(loads)} (of 1-{max(refusals)})"
    refused = [tp for tp, why in refusals.items() if why is not None]
    if refused:
        tp = min((t for t in refused if t & (t - 1) == 0), default=refused[0])
        line += f"; not {tp}: {refusals[tp]} (every size's reason in {REPORT_FILE})"
    return line


def plot(curves: list[list[float]], path: Path, title: str, refinement: list[dict] | None = None) -> None:
    """The solver's loss curves; with refinement a second panel: each layer's held-back output error before
    and after it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = bool(curves) + bool(refinement)
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4), squeeze=False)
    if refinement:
        rx = axes[0, -1]
        layers = [r["layer"] for r in refinement]
        rx.plot(layers, [r["held_error_start"] for r in refinement], "o-", label="after the solves")
        rx.plot(layers, [r["held_error_end"] for r in refinement], "o-", label="after refinement")
        rx.set(xlabel="decoder layer", ylabel="held-back output error", yscale="log",
               title="refinement: ‖layer(x) − y‖² / ‖y − x‖²")
        rx.legend()
    if curves:
        ax = axes[0, 0]
        for c in curves:
            ax.plot(c, color="tab:blue", alpha=0.15, linewidth=0.8)
        longest = max(len(c) for c in curves)
        mean = [sum(c[min(i, len(c) - 1)] for c in curves) / len(curves) for i in range(longest)]
        ax.plot(mean, color="black", linewidth=2, label="mean over layers")
        ax.set(xlabel="iteration", ylabel="relative proxy loss", yscale="log", title=title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
