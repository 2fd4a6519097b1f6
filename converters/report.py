"""armor_report.json (per layer: method, block size, proxy loss at start and end, iterations,
seconds) and a loss-curve PNG, written into the checkpoint directory."""
from __future__ import annotations

import json
from pathlib import Path

REPORT_FILE = "armor_report.json"
CURVE_FILE = "loss_curve.png"


def write(dst: Path, summary: dict) -> None:
    layers = summary["layers"]
    starts = [r["loss_start"] for r in layers]
    ends = [r["loss_end"] for r in layers]
    summary = dict(summary, mean_loss_start=sum(starts) / len(starts), mean_loss_end=sum(ends) / len(ends))
    slim = dict(summary, layers=[{k: v for k, v in r.items() if k != "history"} for r in layers])
    (dst / REPORT_FILE).write_text(json.dumps(slim, indent=2))
    curves = [r["history"] for r in layers if r["history"]]
    if curves:
        plot(curves, dst / CURVE_FILE, f"{summary['method']}: relative proxy loss per layer")


def plot(curves: list[list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
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
