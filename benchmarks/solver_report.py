"""Markdown for `python -m benchmarks.solver_speed --doc`: the section "solver_speed" of docs/results.md."""
from __future__ import annotations

from .common import machine

POINTS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300)   # wall-clock seconds of the loss-against-time table
DEFAULT_ITERS = 100                              # the converter's "default" preset (converters.conversion.driver.PRESETS)


def shape(row: dict) -> str:
    return f"{row['shape'][0]}×{row['shape'][1]}"


def loss_at(run: dict, t: float) -> float | None:
    """Best loss recorded by wall time t; None once t is past the end of the run."""
    if t > run["seconds"]:
        return None
    return min(loss for s, loss in run["trace"] if s <= t)


def comparison_table(results: list[dict]) -> list[str]:
    lines = ["| layer | N×K | b | NoWag-P loss | adam: it, s/it, total s | adam final loss | exact: it, s/it | "
             "exact final loss | exact: it, s to adam's final loss | speedup |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        ad, ex = r["adam"], r["exact"]
        its = next((i for i, (_, loss) in enumerate(ex["trace"]) if loss <= r["target_loss"]), None)
        reach = f"{its}, {r['exact_seconds_to_target']:.2f}" if its is not None else "not reached"
        speed = f"**{r['speedup']:.1f}×**" if r["speedup"] else "–"
        lines.append(f"| {r['layer']} | {shape(r)} | {r['block_size']} | {ad['loss_start']:.4g} | "
                     f"{ad['iters']}, {ad['sec_per_iter']:.3g}, {ad['seconds']:.1f} | {ad['loss_end']:.4g} | "
                     f"{ex['iters']}, {ex['sec_per_iter']:.3g} | {ex['loss_end']:.4g} | {reach} | {speed} |")
    return lines


def loss_time_table(results: list[dict]) -> list[str]:
    horizon = max(max(r["adam"]["seconds"], r["exact"]["seconds"]) for r in results)
    points = [t for t in POINTS if t < horizon]
    lines = ["| layer | solver | " + " | ".join(f"{t:g} s" for t in points) + " | end |",
             "|---|---|" + "--:|" * (len(points) + 1)]
    for r in results:
        for name in ("adam", "exact"):
            run = r[name]
            cells = [f"{x:.4g}" if (x := loss_at(run, t)) is not None else "" for t in points]
            lines.append(f"| {r['layer']} | {name} | " + " | ".join(cells) +
                         f" | {run['loss_end']:.4g} @ {run['seconds']:.1f} s |")
    return lines


def sweep_table(sweep: list[dict]) -> list[str]:
    lines = ["| N×K | b | adam s/it | exact s/it | exact / adam | exact ns per weight·it | exact setup s | "
             f"exact, {DEFAULT_ITERS} it (converter default), s |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in sweep:
        ad, ex = r["adam"]["sec_per_iter"], r["exact"]["sec_per_iter"]
        weights = r["shape"][0] * r["shape"][1]
        lines.append(f"| {shape(r)} | {r['block_size']} | {ad:.3g} | {ex:.3g} | {ex / ad:.2f} | "
                     f"{ex / weights * 1e9:.3g} | {r['exact']['setup']:.2g} | "
                     f"{r['exact']['setup'] + DEFAULT_ITERS * ex:.3g} |")
    return lines


def growth_lines(sweep: list[dict]) -> list[str]:
    """Cost ratios between sweep rows that differ in one thing (N, K, N·K or b)."""
    rows = {(shape(r), r["block_size"]): r for r in sweep}

    def ratio(a: tuple, b: tuple, what: str) -> str | None:
        if a not in rows or b not in rows:
            return None
        ra, rb = rows[a], rows[b]
        w = (rb["shape"][0] * rb["shape"][1]) / (ra["shape"][0] * ra["shape"][1])
        f = {s: rb[s]["sec_per_iter"] / ra[s]["sec_per_iter"] for s in ("adam", "exact")}
        return (f"- {what}: {a[0]} b={a[1]} → {b[0]} b={b[1]} (weights ×{w:.2f}, b ×{b[1] / a[1]:g}): "
                f"s/it ×{f['exact']:.2f} exact, ×{f['adam']:.2f} adam")

    pairs = [(("576×576", 64), ("1536×576", 64), "N"), (("576×576", 64), ("576×1536", 64), "K"),
             (("576×576", 64), ("1536×1536", 64), "N and K"), (("1536×1536", 64), ("4096×4096", 64), "N and K"),
             (("4096×4096", 16), ("4096×4096", 32), "b"), (("4096×4096", 32), ("4096×4096", 64), "b"),
             (("4096×4096", 64), ("4096×4096", 128), "b"), (("4096×4096", 16), ("4096×4096", 128), "b")]
    return [line for a, b, what in pairs if (line := ratio(a, b, what))]


def markdown(report: dict) -> str:
    results, sweep = report["results"], report["sweep"]
    start, end = report["load_average"]          # end is None where it was not recorded
    load = f"{start:.1f} at the start" + (f", {end:.1f} at the end" if end is not None else "")
    out = ["## Solver speed: exact vs the reference Adam step", "",
           "ARMOR's continuous step, the reference's one Adam step on A, B and W' per iteration (lr 1e-4, "
           "1 mask group per tile per iteration) against the exact block-coordinate solver (normal equations "
           "for A and B, 4 CG steps on the kept values of S, "
           f"{results[0]['exact_groups_per_tile'] if results else 16} mask groups per tile per iteration, "
           "the converter's default). Both start from the same NoWag-P state with early stopping off. Loss "
           "is the relative proxy loss ‖(Ŵ − W̄) diag(√h)‖² / ‖W̄ diag(√h)‖² on the NoWag-normalised "
           "weight W̄. **Speedup** = adam's wall time for its whole budget / the exact solver's wall time "
           "to reach adam's final loss (setup included on both sides). s/it is the steady-state cost "
           "(iterations 2..n); setup is the NoWag-P start and tiling.", "",
           f"Layers: {report['layer_source']}. Synthetic layers (the large 4096×4096 and 11008×4096, the "
           "cost sweep) have a Gaussian W with 1% heavy input columns (×8) and a log-normal h. All runs "
           f"single-threaded (`torch.set_num_threads({report['threads']})`) for comparability, on a shared "
           f"machine (1-min load average {load}: other jobs ran alongside, so single timings carry noise "
           "of tens of percent); the whole "
           f"command took {report['wall_seconds'] / 60:.1f} min.", ""]
    if results:
        out += ["### Per layer", ""] + comparison_table(results) + [""]
        first = [r for r in results if len(r["exact"]["trace"]) > 1 and r["exact"]["trace"][1][1] <= r["target_loss"]]
        if first:
            out += [f"In {len(first)} of {len(results)} layers the exact solver's first iteration already goes "
                    "below adam's final loss, so there the speedup is adam's budget over one exact iteration "
                    "(plus setup) and grows with adam's budget; the final losses say how far apart the two "
                    "end.", ""]
        out += ["### Loss against wall time", "",
                "Best loss reached by each wall-clock time (blank: that solver had already finished; "
                "the end column gives its final loss and total time).", ""]
        out += loss_time_table(results) + [""]
    if sweep:
        out += ["### Cost per iteration against N, K and b", "",
                "Synthetic layers, "
                f"{' / '.join(sorted({str(r['iters']) for r in sweep}))} iterations each; ns per weight·it = "
                "s/it / (N·K). The last column estimates one linear at the converter's default preset "
                f"(exact solver, {DEFAULT_ITERS} iterations): setup + {DEFAULT_ITERS} × s/it.", ""]
        out += sweep_table(sweep) + ["", "Growth:", ""] + growth_lines(sweep) + [""]
    out += [f"Machine: {machine()}.", "", f"Command: `{report['command']}`"]
    return "\n".join(out)
