"""Refinement settings on single layers of a finished conversion: `python -m benchmarks.refine_sweep WORK_DIR LAYERS SETTINGS...`.

Cheap where a whole-model run is not: for each listed decoder layer of the default model, the solves
saved in an ARMOR work directory (`armor-convert ... --keep-work`, default preset) are refined with each
setting (JSON of `RefineOptions` fields, e.g. '{"lr": 3e-3, "batch": 4, "steps": 32}') against the dense
model's inputs and outputs, and the held-back output error before and after is printed. The defaults
of `--refine-*` were chosen with it (docs/converter.md); perplexity comes from benchmarks.refinement.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from converters.commands.default_model import default_model_dir
from converters.conversion.activations import Activations
from converters.conversion.calibration import capture_layer_inputs, decoder_layer_names, decoder_layers, run_layer
from converters.conversion.refine import RefineOptions, refine_layer
from converters.data import calibration_samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work_dir", help="an ARMOR work directory of the default model (its layers/ holds the solves)")
    p.add_argument("layers", help="decoder layers, e.g. 4,15")
    p.add_argument("settings", nargs="+", help="JSON objects of RefineOptions fields")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    src = default_model_dir()
    dense = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    samples = calibration_samples(AutoTokenizer.from_pretrained(src), "wiki", a.nsamples, a.seqlen, 0)
    x, kw = capture_layer_inputs(dense, samples, "cpu", lambda s: Activations(a.nsamples, s, torch.float32))
    want = sorted(int(i) for i in a.layers.split(","))
    for i, (layer, prefix) in enumerate(zip(decoder_layers(dense), decoder_layer_names(dense))):
        if i > want[-1]:
            break
        y = Activations(a.nsamples, x.shape, torch.float32)
        run_layer(layer, x, kw, "cpu", y)
        if i in want:
            results = [torch.load(f) for f in sorted((Path(a.work_dir) / "layers").glob(f"{prefix}.*.pt"))]
            for s in a.settings:
                _, rec = refine_layer(layer, prefix + ".", results, x, y, kw, RefineOptions(mode="block", **json.loads(s)), seed=i)
                print(f"layer {i} {s}: held-back output error {rec['held_error_start']:.4f} -> {rec['held_error_end']:.4f}"
                      f" (best at step {rec['best_step']}, {rec['seconds']:.0f} s)", flush=True)
        x = y


if __name__ == "__main__":
    main()
