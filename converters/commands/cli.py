"""Console scripts: armor-convert, armor-eval, armor-prepare-default."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from .default_model import default_model_dir

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, OSError, FloatingPointError)
OPTION_FLAGS = ("block_size", "iters", "solver", "groups_per_tile")  # method options with a flag


def _model_path(arg: str) -> Path:
    """'default' names the embedded SmolLM2-135M-Instruct (materialised on first use)."""
    return default_model_dir() if arg == "default" else Path(arg)


def _run(fn):
    try:
        fn()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def convert_main(argv: list[str] | None = None) -> None:
    from converters.conversion.driver import convert

    _run(lambda: print(f"wrote {convert(convert_config(argv))}"))


def convert_config(argv: list[str] | None = None):
    """The ``ConvertConfig`` an armor-convert command line asks for (bad flags: argparse exits 2)."""
    from converters.conversion.driver import PRESETS, ConvertConfig
    from armor_vllm.format import SCHEMES
    from converters.conversion.methods import METHODS, make_options, method_spec
    from converters.conversion.refine import INPUTS as REFINE_INPUTS, MODES as REFINE_MODES, PARAMS as REFINE_PARAMS
    from converters.conversion.refine import RefineOptions

    p = argparse.ArgumentParser("armor-convert", description="Compress a HF causal LM to a 2:4 ARMOR checkpoint.")
    p.add_argument("model_dir", help="HF model directory, or 'default' for the embedded SmolLM2-135M-Instruct")
    p.add_argument("out_dir")
    p.add_argument("--method", default="armor", choices=sorted(METHODS))
    p.add_argument("--scheme", default="none", choices=SCHEMES,
                   help="kept values of S: the model dtype (none) or W8A16: int8 with one symmetric scale per output "
                        "channel, the blocks re-solved around the rounding (compressed-tensors' preset name)")
    r = p.add_argument_group("refinement", "tune each compressed decoder layer so that its output matches the dense "
                             "layer's (block-wise reconstruction; docs/converter.md)")
    r.add_argument("--refine", choices=REFINE_MODES, help="none, or block: after each layer's solves (default: the preset's)")
    r.add_argument("--refine-steps", type=int, help="Adam steps per decoder layer")
    r.add_argument("--refine-lr", type=float, help="learning rate relative to each tensor's RMS")
    r.add_argument("--refine-batch", type=int, help="calibration samples per step")
    r.add_argument("--refine-holdout", type=int, help="calibration samples held back to keep the best state (default: 1/8 of --nsamples, at least 1)")
    r.add_argument("--refine-inputs", choices=REFINE_INPUTS,
                   help="dense: the dense model's layer inputs and outputs; sequential: the compressed model's inputs, "
                        "the dense layer's output on them; mixed: the compressed model's inputs, the dense model's outputs")
    r.add_argument("--refine-params", choices=REFINE_PARAMS,
                   help="what is tuned: the blocks and S's kept values (int8: their scales), or the blocks only")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="quick: 16×512 calibration, 20 iters; default: 64×512, 100, --refine block; paper: 128×4096, 20000 iters, b=128, adam")
    p.add_argument("--block-size", type=int)
    p.add_argument("--iters", type=int)
    p.add_argument("--solver", choices=["exact", "adam"], help="exact block updates (default) or the reference's Adam step")
    p.add_argument("--groups-per-tile", type=int, help="mask groups re-solved per b×b tile per iteration (default 16)")
    p.add_argument("--calib", default="wiki", help="wiki (embedded Wikipedia leads), a text file, wikitext2 or c4")
    p.add_argument("--nsamples", type=int)
    p.add_argument("--seqlen", type=int)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:i")
    p.add_argument("--workers", type=int, default=1,
                   help="solves at once: local processes (one per GPU with --device cuda) or Ray tasks")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where solves run: this machine, or Ray (a local instance started on demand; pip install armor-vllm[ray])")
    p.add_argument("--ray-address", help="run the solves on this existing Ray cluster (implies --executor ray)")
    p.add_argument("--calibration", choices=["dense", "sequential"],
                   help="statistics from the dense model, or layer i+1's from the compressed layer i (default: the method's)")
    p.add_argument("--activations", choices=["auto", "ram", "disk"], default="auto",
                   help="calibration activations in RAM or spilled to the work dir (auto: disk when they would take > 1/4 of free RAM)")
    p.add_argument("--activation-dtype", choices=["float32", "model"], default="float32",
                   help="keep calibration activations in fp32 or in the model's dtype (half the bytes for bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shared-input-transform", action="store_true",
                   help="q/k/v and gate/up share one B_in (one sparse GEMM per fused layer at serving time)")
    p.add_argument("--layers", help="decoder layers to compress, e.g. 0-3,7 (others stay dense)")
    p.add_argument("--ignore", nargs="*", default=["lm_head"], help="linears left dense: exact module names or re:REGEX (compressed-tensors' and vLLM's rule)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="output dtype (default: the source's)")
    p.add_argument("--work-dir", help="resume directory (default: OUT_DIR.armor-work)")
    p.add_argument("--stats-dir", help="calibration statistics directory, reusable across runs (default: in the work dir)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory after success")
    p.add_argument("--discard-work", action="store_true",
                   help="delete the results a run with other settings left in the work directory, then start over")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it is a checkpoint directory (refused if it holds anything else)")
    a = p.parse_args(argv)

    preset = PRESETS[a.preset]
    fields = {f.name for f in dataclasses.fields(method_spec(a.method).options)}
    given = {k: getattr(a, k) for k in OPTION_FLAGS if getattr(a, k) is not None}
    opts = {**{k: v for k, v in preset.items() if k in fields}, **given}
    pick = lambda name: getattr(a, name) if getattr(a, name) is not None else preset[name]  # noqa: E731
    flags = {f.name: getattr(a, "refine" if f.name == "mode" else f"refine_{f.name}") for f in dataclasses.fields(RefineOptions)}
    refine = {**preset.get("refine", {}), **{k: v for k, v in flags.items() if v is not None}}
    return ConvertConfig(model_dir=_model_path(a.model_dir), out_dir=Path(a.out_dir), method=a.method,
                         options=make_options(a.method, **opts), scheme=a.scheme, refine=RefineOptions(**refine), calib=a.calib,
                         nsamples=pick("nsamples"), seqlen=pick("seqlen"), seed=a.seed, device=a.device, workers=a.workers,
                         executor=a.executor, ray_address=a.ray_address, calibration=a.calibration,
                         activations=a.activations, activation_dtype=a.activation_dtype,
                         shared_input_transform=a.shared_input_transform, ignore=a.ignore,
                         layers=parse_layers(a.layers), dtype=a.dtype, work_dir=a.work_dir, stats_dir=a.stats_dir,
                         overwrite=a.overwrite, keep_work=a.keep_work, discard_work=a.discard_work)


def parse_layers(spec: str | None) -> list[int] | None:
    """'0-3,7' -> [0, 1, 2, 3, 7]."""
    if not spec:
        return None
    out = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            lo_i, hi_i = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"--layers {spec}: expected decoder layer indices like 0-3,7") from None
        if hi_i < lo_i:
            raise ValueError(f"--layers {spec}: range {part} runs backwards")
        out.extend(range(lo_i, hi_i + 1))
    return sorted(set(out))


def eval_main(argv: list[str] | None = None) -> None:
    from converters.evaluation.evaluate import perplexity

    p = argparse.ArgumentParser("armor-eval", description="Evaluate a dense HF directory or an ARMOR checkpoint.")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("ppl", help="perplexity on non-overlapping windows, fp32 logits")
    q.add_argument("model_dir", help="model directory, or 'default'")
    q.add_argument("--data", default="wiki-test", help="wiki-test, wiki-calib, a text file, wikitext2 or c4")
    q.add_argument("--seqlen", type=int, default=2048)
    q.add_argument("--max-windows", type=int, help="score only the first N windows")
    q.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    q.add_argument("--device", default="cpu")
    q.add_argument("--json", action="store_true", help="print the result as one JSON line")
    a = p.parse_args(argv)

    def run():
        if a.seqlen < 2:
            raise ValueError(f"--seqlen {a.seqlen}: a window needs at least 2 tokens")
        if a.max_windows is not None and a.max_windows < 1:
            raise ValueError(f"--max-windows {a.max_windows}: expected a positive number of windows")
        r = perplexity(_model_path(a.model_dir), a.data, a.seqlen, a.max_windows, a.backend, a.device)
        print(r.to_json() if a.json else f"ppl {r.ppl:.3f} ({a.data}, {r.windows} windows × {r.seqlen} tokens, "
                                          f"{r.tokens} tokens scored, backend {r.backend}, {r.seconds:.0f} s)")

    _run(run)


def prepare_default_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("armor-prepare-default",
                                description="Materialise the embedded SmolLM2-135M-Instruct as a plain HF directory.")
    p.add_argument("--cache-dir", help="default: $ARMOR_CACHE_DIR or ~/.cache/armor-vllm")
    a = p.parse_args(argv)
    _run(lambda: print(default_model_dir(a.cache_dir)))
