"""Bad input, one row each: the command line, the words its one-line `error:` must contain, and that
nothing was written. Plus the user's files: what the converter may delete and what it must not.

A new option joins BAD_INPUT with a row. Rows run the console scripts' entry points in-process
(the same code as `armor-convert`/`armor-eval`, without the seconds of a fresh interpreter each).
"""
from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from armor_vllm import format as fmt
from converters.commands.cli import convert_main, eval_main
from converters.conversion.workdir import SETTINGS
from tests.tiny_models import CORPUS, build, edit_checkpoint, resharded, save_tokenizer, tiny_dense

FAST = ["--nsamples", "4", "--seqlen", "32", "--block-size", "32", "--iters", "2", "--calib", "{calib}"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Models and files the rows refer to as {name}; created once, never modified by a row."""
    root = tmp_path_factory.mktemp("inputs")
    d = {"src": tiny_dense(root)}
    d["calib"] = root / "calib.txt"
    d["calib"].write_text("\n\n".join(CORPUS * 30))
    d["binary"] = root / "weights.bin"
    d["binary"].write_bytes(bytes(range(256)) * 64)
    d["small_vocab"] = tiny_dense(root / "vocab", vocab_size=64)  # its tokenizer still has 1024 tokens
    d["truncated"] = root / "truncated"
    shutil.copytree(d["src"], d["truncated"])
    shard = d["truncated"] / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    d["bert"] = _tiny_bert(root / "bert")
    d["sharded"] = resharded(d["src"], root / "sharded")
    d["index_missing_shard"] = root / "index-missing-shard"
    shutil.copytree(d["sharded"], d["index_missing_shard"])
    next(d["index_missing_shard"].glob("model-00002-of-*.safetensors")).unlink()
    d["index_extra_tensor"] = root / "index-extra-tensor"
    shutil.copytree(d["sharded"], d["index_extra_tensor"])
    index = json.loads((d["index_extra_tensor"] / fmt.INDEX_FILE).read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = min(index["weight_map"].values())
    (d["index_extra_tensor"] / fmt.INDEX_FILE).write_text(json.dumps(index))
    d["armor"] = build(root / "tiny").armor
    d["armor_truncated"] = root / "armor-truncated"
    shutil.copytree(d["armor"], d["armor_truncated"])
    for f in d["armor_truncated"].glob("*.safetensors"):
        f.write_bytes(f.read_bytes()[:100])
    d["armor_group_scales"] = edit_checkpoint(  # a W8A16 checkpoint whose config claims scales per group of 128
        build(root / "tiny-w8a16", scheme="W8A16").armor, root / "armor-group-scales",
        config_fn=lambda c: {**c, "quantization_config": {**c["quantization_config"], "config_groups": {"group_0": {
            **c["quantization_config"]["config_groups"]["group_0"],
            "weights": {**c["quantization_config"]["config_groups"]["group_0"]["weights"], "strategy": "group"}}}}})
    d["no_config"] = root / "no-config"
    d["no_config"].mkdir()
    d["foreign"] = root / "foreign"          # an existing directory with a user's file in it
    d["foreign"].mkdir()
    (d["foreign"] / "important.txt").write_text("x")
    (d["foreign"] / "config.json").write_text("{}")
    return d


def _tiny_bert(out: Path) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    BertForMaskedLM(BertConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=128)).save_pretrained(out)
    save_tokenizer(out)
    return out


CUDA = torch.cuda.is_available()
# (id, entry point, argv with {name} placeholders, words the error must contain)
BAD_INPUT = [
    ("block-size-0", convert_main, ["{src}", "{out}", *FAST, "--block-size", "0"], ["--block-size 0", "multiple of 4"]),
    ("block-size-negative", convert_main, ["{src}", "{out}", *FAST, "--block-size", "-64"], ["--block-size -64"]),
    ("block-size-not-dividing", convert_main, ["{src}", "{out}", *FAST, "--block-size", "24"],
     ["--block-size 24 does not divide", "valid block sizes"]),
    ("iters-negative", convert_main, ["{src}", "{out}", *FAST, "--iters", "-1"], ["--iters -1"]),
    ("option-of-another-method", convert_main, ["{src}", "{out}", "--method", "wanda", "--block-size", "64"],
     ["--method wanda does not take --block-size"]),
    ("nsamples-0", convert_main, ["{src}", "{out}", *FAST, "--nsamples", "0"], ["--nsamples 0"]),
    ("seqlen-0", convert_main, ["{src}", "{out}", *FAST, "--seqlen", "0"], ["--seqlen 0"]),
    ("seqlen-too-long", convert_main, ["{src}", "{out}", *FAST, "--seqlen", "100000"], ["--seqlen 100000", "max_position"]),
    ("workers-0", convert_main, ["{src}", "{out}", *FAST, "--workers", "0"], ["--workers 0"]),
    ("layers-out-of-range", convert_main, ["{src}", "{out}", *FAST, "--layers", "1,99"], ["--layers", "[99]", "0-1"]),
    ("layers-not-numbers", convert_main, ["{src}", "{out}", *FAST, "--layers", "a-b"], ["--layers a-b"]),
    ("layers-backwards", convert_main, ["{src}", "{out}", *FAST, "--layers", "1-0"], ["--layers 1-0", "backwards"]),
    ("device-unknown", convert_main, ["{src}", "{out}", *FAST, "--device", "gpu"], ["--device gpu"]),
    pytest.param(convert_main, ["{src}", "{out}", *FAST, "--device", "cuda"], ["--device cuda", "no CUDA GPU"],
                 id="device-cuda-without-gpu", marks=pytest.mark.skipif(CUDA, reason="this machine has CUDA")),
    ("calib-binary-file", convert_main, ["{src}", "{out}", *FAST, "--calib", "{binary}"],
     ["--calib", "weights.bin", "not UTF-8"]),
    ("calib-unknown", convert_main, ["{src}", "{out}", *FAST, "--calib", "no-such-text"], ["no-such-text", "not a file"]),
    ("model-missing", convert_main, ["{tmp}/nope", "{out}", *FAST], ["nope", "does not exist"]),
    ("model-without-config", convert_main, ["{no_config}", "{out}", *FAST], ["no-config", "no config.json"]),
    ("model-not-causal", convert_main, ["{bert}", "{out}", *FAST], ["BertForMaskedLM", "not a causal language model"]),
    ("model-already-armor", convert_main, ["{armor}", "{out}", *FAST], ["already quantized (armor)"]),
    ("vocab-mismatch", convert_main, ["{small_vocab}", "{out}", *FAST, "--calib", "{calib}"],
     ["token id", "vocab_size is 64"]),
    ("truncated-shard", convert_main, ["{truncated}", "{out}", *FAST], ["truncated/model.safetensors", "truncated?"]),
    ("index-missing-shard", convert_main, ["{index_missing_shard}", "{out}", *FAST],
     ["model-00002-of-", "listed in model.safetensors.index.json but missing"]),
    ("index-tensor-missing", convert_main, ["{index_extra_tensor}", "{out}", *FAST],
     ["model.layers.9.mlp.up_proj.weight", "absent"]),
    ("output-is-input", convert_main, ["{src}", "{src}", *FAST, "--overwrite"], ["input model directory"]),
    ("output-inside-input", convert_main, ["{src}", "{src}/armor", *FAST], ["input model directory"]),
    ("output-exists", convert_main, ["{src}", "{foreign}", *FAST], ["foreign", "--overwrite"]),
    ("overwrite-foreign-files", convert_main, ["{src}", "{foreign}", *FAST, "--overwrite"],
     ["important.txt", "not part of a checkpoint"]),
    ("ignore-matches-nothing", convert_main, ["{src}", "{out}", *FAST, "--ignore", "q_proj"],
     ["--ignore q_proj", "matches no linear", "re:.*q_proj"]),
    ("ignore-splits-fused-group", convert_main, ["{src}", "{out}", *FAST, "--ignore", "model.layers.0.self_attn.q_proj"],
     ["splits a fused group", "model.layers.0.self_attn.k_proj"]),
    ("refine-steps-0", convert_main, ["{src}", "{out}", *FAST, "--refine", "block", "--refine-steps", "0"],
     ["--refine-steps 0", "positive integer"]),
    ("refine-lr-negative", convert_main, ["{src}", "{out}", *FAST, "--refine", "block", "--refine-lr=-1e-3"],
     ["--refine-lr -0.001", "positive learning rate"]),
    ("refine-lr-nan", convert_main, ["{src}", "{out}", *FAST, "--refine", "block", "--refine-lr", "nan"],
     ["--refine-lr nan"]),
    ("refine-holdout-all-samples", convert_main, ["{src}", "{out}", *FAST, "--refine", "block", "--refine-holdout", "4"],
     ["--refine-holdout 4", "less than --nsamples"]),
    ("refine-one-sample", convert_main, ["{src}", "{out}", *FAST, "--nsamples", "1"],  # the default preset refines
     ["--nsamples 1", "at least 2 calibration samples", "--refine none"]),
    ("eval-seqlen-0", eval_main, ["ppl", "{src}", "--seqlen", "0"], ["--seqlen 0"]),
    ("eval-seqlen-negative", eval_main, ["ppl", "{src}", "--seqlen", "-5"], ["--seqlen -5"]),
    ("eval-max-windows-0", eval_main, ["ppl", "{src}", "--max-windows", "0"], ["--max-windows 0"]),
    ("eval-binary-data", eval_main, ["ppl", "{src}", "--data", "{binary}", "--seqlen", "16"],
     ["--data", "weights.bin", "not UTF-8"]),
    ("eval-truncated-checkpoint", eval_main, ["ppl", "{armor_truncated}", "--seqlen", "16"],
     ["armor-truncated/model", "truncated?"]),
    ("eval-unknown-quantization", eval_main, ["ppl", "{armor_group_scales}", "--seqlen", "16"],
     ["config.json: quantization_config.config_groups.group_0.weights.strategy='group'", "expected 'channel'"]),
]


def fill(argv: list[str], inputs: dict, tmp: Path) -> list[str]:
    names = {**{k: str(v) for k, v in inputs.items()}, "tmp": str(tmp), "out": str(tmp / "out")}
    return [a.format(**names) for a in argv]


def _tree(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime for p in root.rglob("*")}


@pytest.mark.parametrize("entry,argv,words", [pytest.param(*r[1:], id=r[0]) if isinstance(r[0], str) else r
                                               for r in BAD_INPUT])
def test_bad_input_is_one_clear_error(inputs, tmp_path, capsys, entry, argv, words):
    before = {str(r): _tree(r) for r in (tmp_path, inputs["src"].parent)}
    with pytest.raises(SystemExit) as e:
        entry(fill(argv, inputs, tmp_path))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err[-5:]
    for w in words:
        assert w in err[-1], (w, err[-1])
    for root, tree in before.items():
        assert _tree(Path(root)) == tree, f"the failed run wrote or deleted files under {root}"


# ---------------------------------------------------------------- the user's files
def test_user_work_dir_loses_only_what_the_run_wrote(inputs, tmp_path):
    work = tmp_path / "w"
    work.mkdir()
    (work / "important.txt").write_text("x")
    convert_main(fill(["{src}", "{out}", *FAST, "--work-dir", str(work), "--layers", "0"], inputs, tmp_path))
    assert sorted(p.name for p in work.iterdir()) == ["important.txt"]
    fmt.read_checkpoint(tmp_path / "out", validate=True)


def test_overwrite_replaces_a_checkpoint_with_readable_files(inputs, tmp_path):
    out = tmp_path / "out"
    for method in ("magnitude", "wanda"):  # the second run replaces the first one's checkpoint
        convert_main(fill(["{src}", "{out}", "--method", method, "--nsamples", "4", "--seqlen", "32",
                           "--calib", "{calib}", "--overwrite"], inputs, tmp_path))
    assert fmt.read_checkpoint(out).qcfg.method == "wanda"
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) & 0o044 == 0o044, f"{f.name} is not readable by group/others"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no work dir, no temp dirs left


def test_rerun_with_other_settings_names_them_and_discard_work_starts_over(inputs, tmp_path, capsys):
    out, work = tmp_path / "out", tmp_path / "out.armor-work"
    argv = fill(["{src}", "{out}", *FAST, "--layers", "0"], inputs, tmp_path)
    convert_main(argv + ["--keep-work"])  # as if a run had died: its work directory stays
    shutil.rmtree(out)
    with pytest.raises(SystemExit):
        convert_main(argv + ["--iters", "3"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "options.iters: 2 -> 3" in err and "--discard-work" in err and str(work) in err
    convert_main(argv + ["--iters", "3", "--discard-work"])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["method_args"]["iters"] == 3
    assert not work.exists()


def _resave_with_metadata(src: Path) -> None:
    """The same tensors saved again with other metadata: the header changes, no tensor's bytes do."""
    f = src / "model.safetensors"
    save_file(load_file(f), f, metadata={"format": "pt", "saved_by": "another tool"})


def _scale_in_place(src: Path) -> None:
    """One tensor's values doubled in place: the header stays byte for byte (a fine-tune saved over the original)."""
    f = src / "model.safetensors"
    data = bytearray(f.read_bytes())
    size = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8:8 + size])["model.layers.0.self_attn.q_proj.weight"]["data_offsets"]
    torch.frombuffer(data, dtype=torch.float32, offset=8 + size + begin, count=(end - begin) // 4).mul_(2)
    f.write_bytes(data)


def _edit_config(src: Path) -> None:
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}, indent=2))


# how the source changes between two runs, and the words that name it in the refusal
SOURCE_CHANGES = {
    "weights-resaved": (_resave_with_metadata, "model.safetensors: header changed"),
    "weights-values": (_scale_in_place, "model.safetensors: tensor values changed"),
    "config": (_edit_config, "config.json changed"),
}


@pytest.mark.parametrize("change", SOURCE_CHANGES)
def test_work_and_stats_dir_of_a_changed_source_are_refused(inputs, tmp_path, capsys, change):
    """A work directory and a shared --stats-dir are reused for the same source content only; the same path
    holding other content gets one line naming the change and --discard-work, exit code 2."""
    src, edit, words = tmp_path / "src", *SOURCE_CHANGES[change]
    shutil.copytree(inputs["src"], src)
    argv = fill(["{tmp}/src", "{out}", *FAST, "--layers", "0", "--stats-dir", "{tmp}/stats"], inputs, tmp_path)
    convert_main(argv + ["--keep-work"])  # as if a run had died: its work directory stays
    shutil.rmtree(tmp_path / "out")
    edit(src)
    other_work = argv[:1] + [str(tmp_path / "other")] + argv[2:]  # a new work dir, the same --stats-dir
    for run, option in ((argv, "--work-dir"), (other_work, "--stats-dir")):
        with pytest.raises(SystemExit) as e:
            convert_main(run)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert e.value.code == 2 and err.startswith("error: ")
        for w in ("from another source model", words, "--discard-work", option):
            assert w in err, (w, err)


def test_unchanged_copy_of_the_source_resumes_and_an_older_work_dir_is_refused(inputs, tmp_path, capsys):
    src, work = tmp_path / "src", tmp_path / "out.armor-work"
    shutil.copytree(inputs["src"], src)
    # no refinement: the second run would reuse the refined layer and never need the statistics it checks
    argv = fill(["{tmp}/src", "{out}", *FAST, "--layers", "0", "--keep-work", "--refine", "none"], inputs, tmp_path)
    convert_main(argv)
    shutil.rmtree(tmp_path / "out")
    solved = {p.name: p.stat().st_mtime_ns for p in (work / "layers").iterdir()}
    shutil.rmtree(src)
    shutil.copytree(inputs["src"], src, copy_function=shutil.copyfile)  # cp without -p: new mtimes
    assert (src / "model.safetensors").stat().st_mtime_ns > max(solved.values())
    convert_main(argv)
    assert "calibration: reusing statistics" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (work / "layers").iterdir()} == solved  # no solve ran again
    shutil.rmtree(tmp_path / "out")
    settings = json.loads((work / SETTINGS).read_text())
    del settings["fingerprint"]["source"]  # as an older converter wrote it
    (work / SETTINGS).write_text(json.dumps(settings))
    with pytest.raises(SystemExit):
        convert_main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "source: not recorded" in err and "--discard-work" in err, err


def test_work_dir_with_foreign_results_is_refused(inputs, tmp_path, capsys):
    work = tmp_path / "w"
    (work / "layers").mkdir(parents=True)
    (work / "layers" / "mine.pt").write_text("user data")
    with pytest.raises(SystemExit):
        convert_main(fill(["{src}", "{out}", *FAST, "--work-dir", str(work)], inputs, tmp_path))
    assert "did not write" in capsys.readouterr().err
    assert (work / "layers" / "mine.pt").read_text() == "user data" and not (work / SETTINGS).exists()
