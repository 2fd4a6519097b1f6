"""converters.commands.reuse (results reused only under the settings that made them) and converters.progress in a log."""
from armor_vllm.format import ArmorFormatError
from converters.commands import reuse
from converters.progress import progress


def test_progress_prints_one_line_per_item_and_nothing_for_inner_bars(capsys):
    for _ in progress(range(3), desc="calibration", unit="layer"):
        inner = progress(total=5, desc="  iterations", inner=True)
        for _ in range(5):
            inner.update(1)
        inner.close()
    bar = progress(total=4, desc="layers", initial=2)
    bar.update(1, note="job a: loss 0.1 -> 0.05")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["calibration 1/3", "calibration 2/3", "calibration 3/3", "layers 3/4"]
    assert lines[-1].endswith(": job a: loss 0.1 -> 0.05")


def test_recorded_only_under_the_same_settings(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert reuse.recorded(path, {"windows": 4}) is None
    reuse.record(path, {"windows": 4}, {"ppl": 12.8})
    assert reuse.recorded(path, {"windows": 4}) == {"ppl": 12.8}
    assert reuse.recorded(path, {"windows": 8}) is None
    assert "other settings" in capsys.readouterr().out


def test_convert_once_converts_again_only_when_the_command_line_changes(tmp_path, monkeypatch):
    calls = []

    def fake_convert(cfg):
        calls.append(cfg)
        (tmp_path / "out").mkdir(exist_ok=True)

    def fake_read(path, validate):
        if not path.is_dir():
            raise ArmorFormatError(f"{path}: no checkpoint")

    monkeypatch.setattr(reuse, "convert", fake_convert)
    monkeypatch.setattr(reuse, "read_checkpoint", fake_read)
    argv = [str(tmp_path / "model"), str(tmp_path / "out"), "--iters", "20"]
    assert reuse.convert_once(argv) and reuse.convert_once(argv) is False
    assert reuse.convert_once(argv[:-1] + ["30"])
    assert [(c.options.iters, c.overwrite, c.discard_work) for c in calls] == [(20, True, True), (30, True, True)]
