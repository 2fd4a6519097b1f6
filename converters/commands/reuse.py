"""Results a later run may reuse (checkpoints, perplexities), each stored with the settings that made it.

A result is reused only when its recorded settings equal the current ones; anything else is made
again, so a number shown next to a command line always comes from that command line.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from armor_vllm.format import ArmorFormatError, read_checkpoint

from .cli import convert_config
from converters.conversion.driver import convert


def recorded(path: Path, settings: dict):
    """The result saved in `path` if it was made with exactly `settings`, else None (saying why)."""
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    if saved.get("settings") == json.loads(json.dumps(settings)):
        return saved.get("result", True)
    print(f"{path}: made with other settings, doing it again", flush=True)
    return None


def record(path: Path, settings: dict, result=True) -> None:
    path.write_text(json.dumps({"settings": settings, "result": result}, indent=2))


def convert_once(argv: list[str]) -> bool:
    """`armor-convert *argv` unless OUT (argv[1]) holds the checkpoint this very command line made.

    The command line is recorded in OUT.settings.json; returns True when it converted.
    """
    out = Path(argv[1])
    stamp = out.with_name(out.name + ".settings.json")
    try:
        read_checkpoint(out, validate=False)
        if recorded(stamp, {"argv": argv}):
            return False
    except (ArmorFormatError, FileNotFoundError):
        pass
    stamp.unlink(missing_ok=True)
    print("$ armor-convert " + " ".join(argv), flush=True)
    convert(dataclasses.replace(convert_config(argv), overwrite=True, discard_work=True))
    record(stamp, {"argv": argv})
    return True
