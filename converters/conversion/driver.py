"""A conversion, start to end: HF dir -> checks -> calibration and solves layer by layer -> ARMOR checkpoint.

The story only; each step has its module: input checks (checks), the streamed model (loader), the
work directory and resume (workdir), the layer-by-layer schedule (pipeline), where solves run
(executors), the sharded output (writer), and the math (methods). A run killed at any point (even
SIGKILL) resumes where it stopped and, with the same seed, produces the same checkpoint.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from armor_vllm.format import SCHEMES, ArmorQuantizationConfig, CalibrationRecord, config_dtype, overhead_ratio, weight_bytes

from . import report
from .activations import spill
from .calibration import decoder_layer_names, decoder_layers
from .checks import (check_device, check_disk, check_finite, check_ignore, check_layers, check_paths, check_shapes,
                     check_tokens, disk_needed, matches, read_hf_config, tensor_parallel_refusals)
from converters.data import calibration_samples
from .executors import Executor, InlineExecutor, PoolExecutor
from .loader import LayerLoader, listed, source_identity
from .methods import MethodOptions, make_options, method_spec
from .pipeline import Pipeline
from .refine import RefineOptions
from .ray_executor import RayExecutor, check_ray_address, import_ray
from .workdir import WorkDir
from .writer import CHECKPOINT_EXTRAS, OutputWriter

EXECUTORS = ("local", "ray")
CALIBRATIONS = ("dense", "sequential")
ACTIVATIONS = ("auto", "ram", "disk")

# quick/default fit a 2-core CPU for the 135M default model; paper = the authors' protocol.
PRESETS = {
    "quick": dict(nsamples=16, seqlen=512, iters=20),
    "default": dict(nsamples=64, seqlen=512, iters=100, refine=dict(mode="block")),
    "paper": dict(nsamples=128, seqlen=4096, iters=20000, block_size=128, solver="adam", groups_per_tile=1),
}


@dataclass(kw_only=True)
class ConvertConfig:
    """One conversion; checked on construction where no file needs reading."""

    model_dir: Path
    out_dir: Path
    method: str = "armor"
    options: MethodOptions | None = None     # the method's own options (None: its defaults)
    scheme: str = "none"                     # kept values: model dtype, or W8A16 (int8 per output row)
    refine: RefineOptions = field(default_factory=RefineOptions)  # block-wise reconstruction after the solves
    calib: str = "wiki"
    nsamples: int = 64
    seqlen: int = 512
    seed: int = 0                            # calibration sampling and per-job solver seeds
    device: str = "cpu"
    workers: int = 1                         # solves at once: local processes, or Ray tasks
    executor: str = "local"                  # local (this process or a process pool) or ray
    ray_address: str | None = None           # an existing Ray cluster (implies executor="ray")
    calibration: str | None = None           # dense or sequential statistics (None: the method's default)
    activations: str = "auto"                # calibration activations in ram, on disk, or auto (by free memory)
    activation_dtype: str = "float32"        # or "model": the model's dtype, half the bytes for bf16
    shared_input_transform: bool = False
    ignore: list[str] = field(default_factory=lambda: ["lm_head"])
    layers: list[int] | None = None          # decoder layers to compress (None: all)
    dtype: str | None = None                 # output dtype (None: the source's)
    work_dir: Path | None = None
    stats_dir: Path | None = None            # calibration statistics, shareable between runs
    collect_xtx: bool = False                # also keep XᵀX when the method doesn't need it
    overwrite: bool = False
    keep_work: bool = False
    discard_work: bool = False               # drop a work directory left by a run with other settings

    def __post_init__(self):
        self.model_dir, self.out_dir = Path(self.model_dir), Path(self.out_dir)
        self.work_dir = Path(self.work_dir) if self.work_dir else self.out_dir.with_name(self.out_dir.name + ".armor-work")
        self.stats_dir = Path(self.stats_dir) if self.stats_dir else None
        self.options = self.options or make_options(self.method)
        if type(self.options) is not method_spec(self.method).options:
            raise TypeError(f"options {type(self.options).__name__} do not belong to method {self.method!r}")
        for name in ("nsamples", "seqlen", "workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name} {v}: expected a positive integer")
        if self.ray_address:
            self.executor = "ray"
        self.calibration = self.calibration or method_spec(self.method).calibration
        self.refine = self.refine.for_samples(self.nsamples)
        if self.refine.on and self.nsamples < 2:
            raise ValueError(f"--nsamples {self.nsamples}: refinement needs at least 2 calibration samples (one held "
                             "back to judge it); pass more, or --refine none")
        if self.refine.on and self.refine.holdout >= self.nsamples:
            raise ValueError(f"--refine-holdout {self.refine.holdout}: must be less than --nsamples {self.nsamples} "
                             "(the other samples train the refinement)")
        for name, allowed in (("executor", EXECUTORS), ("calibration", CALIBRATIONS), ("activations", ACTIVATIONS),
                              ("activation_dtype", ("float32", "model")), ("scheme", SCHEMES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected one of {', '.join(allowed)}")

    @property
    def block_size(self) -> int | None:
        return getattr(self.options, "block_size", None)

    @property
    def need_xtx(self) -> bool:
        return self.collect_xtx or method_spec(self.method).needs_xtx

    def work_bytes(self, hf_config: dict) -> int:
        """Disk beyond the checkpoint and the solves: XᵀX statistics (one K×K fp32 matrix per linear: six
        read the hidden state, down_proj the intermediate one), and the two activation buffers if they spill."""
        h, m = hf_config.get("hidden_size", 0), hf_config.get("intermediate_size", 0)
        xtx = hf_config.get("num_hidden_layers", 0) * (6 * h * h + m * m) * 4 if self.need_xtx else 0
        elem = (torch.float32 if self.activation_dtype == "float32" else config_dtype(hf_config)).itemsize
        buffer = self.nsamples * self.seqlen * h * elem
        return xtx + (2 * buffer if spill(self.activations, buffer) else 0)

    def _compression(self) -> dict:
        """What the compressed layers depend on; with sequential statistics that includes the refinement of the
        layers before (a later layer's statistics come from them)."""
        refine = {"refine": dataclasses.asdict(self.refine)} if self.calibration == "sequential" else {}
        return {**refine, "method": self.method, "scheme": self.scheme, "shared_input_transform": self.shared_input_transform,
                "ignore": self.ignore, "layers": self.layers, "options": dataclasses.asdict(self.options)}

    @cached_property
    def source(self) -> dict[str, str]:
        """The source model's content identity (loader.source_identity), read once per run."""
        return source_identity(self.model_dir)

    def calib_fingerprint(self) -> dict:
        """What determines the statistics: the source's content (not its path), and with sequential
        calibration also how the earlier layers were compressed."""
        fp = {"source": self.source, "calib": self.calib, "nsamples": self.nsamples,
              "seqlen": self.seqlen, "seed": self.seed, "xtx": self.need_xtx, "calibration": self.calibration,
              "activation_dtype": self.activation_dtype}
        return {**fp, **self._compression()} if self.calibration == "sequential" else fp

    def fingerprint(self) -> dict:
        """What determines the solves: a work dir from different settings is never reused."""
        return {**self.calib_fingerprint(), **self._compression()}

    def refine_fingerprint(self) -> dict:
        """What determines the refined layers beyond the solves (the activations refinement reads: dense or
        compressed stream, so also the calibration order)."""
        return {"refine": dataclasses.asdict(self.refine), "calibration": self.calibration}


def find_targets(model: nn.Module, cfg: ConvertConfig) -> dict[str, tuple[int, nn.Linear]]:
    """Decoder-layer nn.Linear modules to compress, by HF name, with their layer index."""
    out = {}
    for i, (layer, prefix) in enumerate(zip(decoder_layers(model), decoder_layer_names(model))):
        if cfg.layers is not None and i not in cfg.layers:
            continue
        for n, m in layer.named_modules():
            full = f"{prefix}.{n}"
            if isinstance(m, nn.Linear) and not matches(full, cfg.ignore):
                out[full] = (i, m)
    if not out:
        raise ValueError(f"{cfg.model_dir}: no nn.Linear layers to compress in the decoder layers of "
                         f"{type(model).__name__} (ignore={cfg.ignore}, layers={cfg.layers})")
    return out


# ---------------------------------------------------------------- the checkpoint
def copy_extras(src: Path, dst: Path) -> None:
    """What a checkpoint needs from the source beside weights and config.json (writer.CHECKPOINT_EXTRAS)."""
    for f in src.iterdir():
        if f.is_file() and listed(f.name, CHECKPOINT_EXTRAS):
            shutil.copy2(f, dst / f.name)


def checkpoint_config(cfg: ConvertConfig, hf_config: dict, model, targets: dict) -> tuple[dict, ArmorQuantizationConfig]:
    """config.json of the output (dtype as written) and its quantization_config."""
    uncompressed = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in targets]
    qcfg = ArmorQuantizationConfig.with_scheme(
        cfg.scheme, block_size=cfg.block_size, method=cfg.method,
        ignore=sorted(set(cfg.ignore) | set(uncompressed)), shared_input_transform=cfg.shared_input_transform,
        calibration=CalibrationRecord(cfg.calib, cfg.nsamples, cfg.seqlen),
        method_args=dataclasses.asdict(cfg.options))
    hf_config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    if cfg.dtype:
        hf_config["dtype"] = hf_config["torch_dtype"] = cfg.dtype
    return hf_config, qcfg


def publish(cfg: ConvertConfig, output: OutputWriter, model, targets: dict, hf_config: dict, records: list[dict],
            refinement: list[dict], t0: float, tensor_parallel: dict[int, str | None]) -> Path:
    """config.json, tokenizer files and the report next to the shards; then the directory goes into place."""
    hf_config, qcfg = checkpoint_config(cfg, hf_config, model, targets)
    shapes = [tuple(m.weight.shape) for _, m in targets.values()]
    summary = {"method": cfg.method, "seconds": time.perf_counter() - t0, "layers": records,
               **({"refine": dataclasses.asdict(cfg.refine), "refinement": refinement} if cfg.refine.on else {}),
               "overhead": overhead_ratio(shapes, cfg.block_size) if cfg.block_size else 0.0,
               **report.tensor_parallel_fields(tensor_parallel)}

    def save_extras(dst: Path):
        copy_extras(cfg.model_dir, dst)
        report.write(dst, summary)

    return output.publish(hf_config, qcfg, save_extras)


def check_inputs(cfg: ConvertConfig) -> tuple[dict, torch.Tensor]:
    """Everything that can be known before loading the model: (config.json, calibration token ids)."""
    from transformers import AutoTokenizer

    hf_config = read_hf_config(cfg.model_dir)
    check_paths(cfg.model_dir, cfg.out_dir, cfg.work_dir, cfg.overwrite)
    check_layers(cfg.layers, hf_config.get("num_hidden_layers", 0), cfg.model_dir)
    check_device(cfg.device)
    max_pos = hf_config.get("max_position_embeddings")
    if max_pos and cfg.seqlen > max_pos:
        raise ValueError(f"--seqlen {cfg.seqlen}: longer than the model's max_position_embeddings {max_pos}")
    check_disk(cfg.out_dir, disk_needed(weight_bytes(cfg.model_dir), config_dtype(hf_config), cfg.work_bytes(hf_config)))
    if cfg.executor == "ray":
        import_ray()
        if cfg.ray_address:
            check_ray_address(cfg.ray_address)
    tok = AutoTokenizer.from_pretrained(cfg.model_dir)
    samples = calibration_samples(tok, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed)
    check_tokens(samples, hf_config["vocab_size"], cfg.model_dir)
    return hf_config, samples


def make_executor(kind: str, device: str, workers: int, ray_address: str | None = None) -> Executor:
    """What --executor/--workers ask for; chosen here so that executors and ray_executor need not import each other."""
    if kind == "ray":
        return RayExecutor(device, workers, ray_address)
    return InlineExecutor(device) if workers == 1 else PoolExecutor(device, workers)


def convert(cfg: ConvertConfig) -> Path:
    """Run the whole conversion; returns the checkpoint directory."""
    hf_config, samples = check_inputs(cfg)
    t0 = time.perf_counter()
    loader = LayerLoader(cfg.model_dir)
    model = loader.model
    check_ignore(cfg.ignore, [n for n, m in model.named_modules() if isinstance(m, nn.Linear)])
    targets = find_targets(model, cfg)
    check_shapes(targets, cfg.block_size)
    check_finite(targets, loader.weights, cfg.model_dir)
    work = WorkDir(cfg.work_dir, cfg.stats_dir)
    work.open(cfg.fingerprint(), cfg.calib_fingerprint(), cfg.refine_fingerprint(), cfg.discard_work)
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else next(model.parameters()).dtype
    embeddings = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    output = OutputWriter(cfg.out_dir, cfg.overwrite, cfg.model_dir, loader.layer_names, embeddings,
                          {f"{n}.weight" for n in targets}, dtype, work.output_dir(cfg.out_dir))
    tensor_parallel = tensor_parallel_refusals(hf_config, {n: tuple(m.weight.shape) for n, (_, m) in targets.items()},
                                               cfg.block_size)
    try:
        with make_executor(cfg.executor, cfg.device, cfg.workers, cfg.ray_address) as executor:
            pipeline = Pipeline(cfg, work, loader, targets, executor, output)
            pipeline.run(samples)
        publish(cfg, output, model, targets, hf_config, pipeline.records(), pipeline.refine_records(), t0,
                tensor_parallel)
    except BaseException:
        output.abort()
        raise
    print(report.tensor_parallel_line(tensor_parallel), flush=True)
    if not cfg.keep_work:
        work.remove()
    return cfg.out_dir
