"""The work directory: what a conversion keeps between steps, so that a killed run resumes.

``<work>/settings.json`` records the settings the results depend on, ``<work>/layers/<job>.pt`` the
finished solves (``.json`` their reports), ``<work>/refined/layer_<i>.pt`` the refined layers (with their
own settings file), ``<work>/stats/layer_<i>.pt`` the calibration statistics
(or ``--stats-dir``, which has a settings file of its own and is never deleted), ``<work>/output/``
the finished shards of the output and ``<work>/activations/`` calibration activations spilled to
disk. Everything is written atomically.

The converter deletes only what it wrote: a directory it was handed (``--work-dir``,
``--stats-dir``) loses just the files the run created, never the directory or anything else in it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

SETTINGS = "settings.json"
SOURCE = "source"  # the fingerprint's entry for the source model's content (loader.source_identity)


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def differences(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(what differs in the source model, 'key: old -> new' for every other setting that differs, nested keys
    dotted). An older converter's fingerprint, without the source's identity, differs in that setting."""
    new = json.loads(json.dumps(new))
    unrecorded = SOURCE in new and SOURCE not in old
    source = [] if unrecorded else _source_diff(old.get(SOURCE, {}), new.get(SOURCE, {}))
    a, b = (_flat({k: v for k, v in d.items() if k != SOURCE}) for d in (old, new))
    other = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return source, ["source: not recorded (an older converter's)", *other] if unrecorded else other


def _source_diff(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """'model.safetensors: header changed', 'config.json changed', 'FILE is gone' / 'is new', one per file
    (identity keys are 'FILE' or 'FILE: part')."""
    files: dict[str, list[str]] = {}
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            files.setdefault(k.partition(": ")[0], []).append(k)
    out = []
    for f, keys in files.items():
        parts = [k.partition(": ")[2] for k in keys if k != f]
        if all(k not in new for k in keys):
            out.append(f"{f} is gone")
        elif all(k not in old for k in keys):
            out.append(f"{f} is new")
        else:
            out.append(f"{f}: {' and '.join(parts)} changed" if parts else f"{f} changed")
    return out


class ResultDir:
    """A directory holding results of one settings fingerprint, and only the entries listed in ``payload``."""

    def __init__(self, root: Path, payload: tuple[str, ...], what: str, option: str):
        self.root, self.payload, self.what, self.option = Path(root), payload, what, option
        self.created = False

    def _ours(self) -> list[Path]:
        return [p for pat in self.payload for p in self.root.glob(pat)] + [self.root / SETTINGS]

    def open(self, fingerprint: dict, discard: bool, also_serves: dict | None = None) -> list[str]:
        """Claim the directory for ``fingerprint``: reuse results of the same settings (or of the settings
        ``also_serves``, whose results include what ``fingerprint`` needs), refuse others (``discard``: delete
        them); returns the differences of the results it deleted."""
        settings = self.root / SETTINGS
        discarded: list[str] = []
        if settings.is_file():
            saved = json.loads(settings.read_text())
            self.created = saved.get("created", False)
            old = saved.get("fingerprint", {})
            source, other = differences(old, fingerprint)
            if not source + other or (also_serves is not None and not any(differences(old, also_serves))):
                return []
            if not discard:
                diff = source + other
                how = " and ".join(w for w, d in (("from another source model", source),
                                                  ("with other settings", other)) if d)
                raise FileExistsError(
                    f"{self.root}: {self.what} of an earlier run {how} ({'; '.join(diff[:6])}"
                    f"{'; …' if len(diff) > 6 else ''}). Pass --discard-work to delete its results and start "
                    f"over, or choose another {self.option}")
            self.remove_payload()
            discarded = source + other
        elif self.root.exists():
            if not self.root.is_dir():
                raise FileExistsError(f"{self.option} {self.root}: exists and is not a directory")
            strays = [p.name for pat in self.payload for p in self.root.glob(pat)]
            if strays:
                raise FileExistsError(f"{self.option} {self.root}: holds {', '.join(strays)} that this converter did "
                                      f"not write (no {SETTINGS}); choose an empty or new directory")
        else:
            self.root.mkdir(parents=True)
            self.created = True
        tmp = settings.with_name(SETTINGS + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "created": self.created}, indent=2))
        os.replace(tmp, settings)
        return discarded

    def remove_payload(self) -> None:
        for p in self._ours()[:-1]:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete what the run wrote; the directory itself only if the run created it and it is now empty."""
        self.remove_payload()
        (self.root / SETTINGS).unlink(missing_ok=True)
        if self.created:
            try:
                self.root.rmdir()
            except OSError:
                pass  # something else lives there now: leave it


class WorkDir:
    """The work directory of one conversion, and the statistics directory inside it or beside it."""

    def __init__(self, root: Path, stats_dir: Path | None = None):
        self.root = Path(root)
        self.own_stats = stats_dir is None
        self.stats_dir = self.root / "stats" if self.own_stats else Path(stats_dir)
        self.work = ResultDir(self.root, ("layers", "refined", "activations", "output"), "work directory", "--work-dir")
        self.stats = ResultDir(self.stats_dir, ("layer_*.pt", "layer_*.pt.tmp"), "statistics directory",
                               "--stats-dir")
        self.refined = ResultDir(self.root / "refined", ("layer_*.pt", "layer_*.pt.tmp"), "refinement results",
                                 "--work-dir")

    def open(self, fingerprint: dict, calib_fingerprint: dict, refine_fingerprint: dict, discard: bool) -> None:
        """Claim the directories. The solves do not depend on refinement (with dense statistics), so other
        refinement settings only replace the refined layers and the shards written from them."""
        self.work.open(fingerprint, discard)
        # statistics with XᵀX (a SparseGPT run's) also serve the methods that only read its diagonal h
        self.stats.open(calib_fingerprint, discard, {**calib_fingerprint, "xtx": True})
        (self.root / "layers").mkdir(exist_ok=True)
        changed = self.refined.open(refine_fingerprint, discard=True)
        if changed:
            shutil.rmtree(self.root / "output", ignore_errors=True)
            print(f"{self.root}: refinement settings changed ({'; '.join(changed[:4])}): keeping the solves, "
                  "refining again", flush=True)

    def refined_path(self, layer: int) -> Path:
        return self.refined.root / f"layer_{layer:04d}.pt"

    def stats_path(self, layer: int) -> Path:
        return self.stats_dir / f"layer_{layer:04d}.pt"

    def result_path(self, key: str) -> Path:
        return self.root / "layers" / f"{key}.pt"

    def record_path(self, key: str) -> Path:
        """The job's report (losses, time): written before its result, which marks the job done."""
        return self.root / "layers" / f"{key}.json"

    @property
    def activations_dir(self) -> Path:
        """Calibration activations spilled to disk (deleted as each layer is done with them)."""
        return self.root / "activations"

    def output_dir(self, out_dir: Path) -> Path | None:
        """Where the output's shards collect until it is published: here, so a resumed run keeps them, when
        this directory is on the output's filesystem (publishing renames it); else None (a temp dir)."""
        parent = out_dir.absolute().parent
        while not parent.exists():
            parent = parent.parent
        return self.root / "output" if os.stat(self.root).st_dev == os.stat(parent).st_dev else None

    def remove(self) -> None:
        """After a successful run: the statistics go with the work directory unless they live in --stats-dir."""
        if self.own_stats:
            self.stats.remove()
        self.work.remove()
