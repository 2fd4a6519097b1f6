"""The x86 ISA levels of the 2:4 CPU kernel, read by setup.py (to build) and by ``sparse_cpu`` (to load).

Each level is one extension module compiled from the same ``armor_vllm/csrc`` sources with its own
``-m`` flags, registering its op under its own namespace (``torch.ops.armor_<level>.linear``).
A level is loaded only where /proc/cpuinfo lists all of its CPU flags (Linux lists a feature only
when the kernel also enabled its register state), so no instruction runs where it is illegal.
Standard library only: setup.py runs this file before anything is installed.
"""
from __future__ import annotations

from pathlib import Path

# fastest first; "cpu_flags" use /proc/cpuinfo's spelling
LEVELS = {
    "avx512": {"source": "kernel_avx512.cpp",
               "cflags": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                          "-mavx512vbmi2", "-mavx512bf16"],
               "cpu_flags": ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vbmi2",
                             "avx512_bf16"]},
    "avx2": {"source": "kernel_avx2.cpp",
             "cflags": ["-mavx2", "-mfma", "-mf16c"],
             "cpu_flags": ["avx2", "fma", "f16c"]},
}
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def module_name(level: str) -> str:
    return f"armor_vllm._sparse24_{level}"


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The first processor's feature flags (empty where there is no /proc/cpuinfo, e.g. not Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def runnable_levels(flags: set[str]) -> list[str]:
    """The levels whose instructions this CPU executes, fastest first."""
    return [lvl for lvl, spec in LEVELS.items() if set(spec["cpu_flags"]) <= flags]
