"""Shared by the benchmark commands: the machine description and section-wise doc updates."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from armor_vllm.kernels import cpu_isa


def machine() -> str:
    """One line naming the machine, so every number in docs says where it was measured."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (f"{cpu} ({isa()}), {os.cpu_count()} cores, {mem:.0f} GiB RAM{gpu}; torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def isa() -> str:
    """The vector extensions that decide the CPU kernels' speed, as /proc/cpuinfo lists them."""
    flags = cpu_isa.cpu_flags()
    names = {"avx2": "AVX2", "avx512f": "AVX-512F", "avx512_bf16": "AVX-512 BF16", "avx512_vbmi2": "AVX-512 VBMI2",
             "amx_bf16": "AMX-BF16"}
    have = [name for flag, name in names.items() if flag in flags]
    levels = cpu_isa.runnable_levels(flags)
    return (f"{', '.join(have) or 'no AVX2'}{'' if 'amx_bf16' in flags else ', no AMX'}; "
            f"2:4 kernel level {levels[0] if levels else 'none'}")


def write_section(doc: str | Path, name: str, markdown: str) -> None:
    """Replace the block between <!-- BEGIN name --> and <!-- END name --> (append it if absent)."""
    doc = Path(doc)
    text = doc.read_text() if doc.exists() else ""
    block = f"<!-- BEGIN {name} -->\n{markdown.strip()}\n<!-- END {name} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(name)} -->.*?<!-- END {re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(text.lstrip())
    os.replace(tmp, doc)


def footer(load: float, cmd: str) -> list[str]:
    """The closing lines of a generated section: where it ran and how to rerun it."""
    return ["", f"Machine: {machine()}; 1-min load average {load:.1f} when the run started "
                "(other jobs shared the cores).", "", f"Command: `{cmd}`"]
