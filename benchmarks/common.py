"""Shared by the benchmark commands: the machine description, the idle guard and section-wise doc updates."""
from __future__ import annotations

import os
import platform
import re
import sys
import time
from dataclasses import dataclass
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


# ---------------------------------------------------------------- idle guard
# A speed ratio means something only on an idle machine: runs where dense was contended had put ARMOR at
# 1.43-1.61x dense (batch 1, 7B shapes); the idle 2-core VM measured 0.92x at one thread (issue 20).
BUSY_MAX = 0.3         # cores that other processes may keep busy, on average, in the sample before or after a run
LOAD_EXCESS_MAX = 0.5  # 1-min load average after a run above the benchmark's own threads
SAMPLE_S = 2.0         # seconds of /proc/stat per sample


@dataclass(frozen=True)
class LoadSample:
    """The machine in one sample window: 1-min load average, cores kept busy (all processes, steal included:
    time a VM's neighbours take is lost to the benchmark too) and the busiest processes by CPU time."""

    load1: float
    busy_cores: float
    top: tuple[str, ...] = ()


def cpu_jiffies(proc_stat: str) -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat's text; idle and iowait are not busy."""
    fields = [int(v) for v in proc_stat.splitlines()[0].split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - fields[3] - fields[4], total


def _process_jiffies() -> dict[int, tuple[str, int]]:
    """{pid: (name, utime + stime)} of every process /proc still shows (others' are readable too)."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                text = (d / "stat").read_text()
            except OSError:  # exited meanwhile
                continue
            name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
            out[int(d.name)] = (name, int(rest[11]) + int(rest[12]))
    return out


def _command(pid: int, name: str, width: int = 60) -> str:
    """The process's command line, shortened (its name where /proc no longer has it)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = ""
    cmd = cmd or name
    return f"`{cmd if len(cmd) <= width else cmd[:width - 1] + '…'}`"


def sample_load(seconds: float = SAMPLE_S, top: int = 3) -> LoadSample:
    """Busy cores over ``seconds`` (from /proc/stat) and the ``top`` processes that used the most CPU then."""
    tick = os.sysconf("SC_CLK_TCK")
    stat = Path("/proc/stat")
    busy0, total0 = cpu_jiffies(stat.read_text())
    procs0, t0 = _process_jiffies(), time.monotonic()
    time.sleep(seconds)
    busy1, total1 = cpu_jiffies(stat.read_text())
    procs1, elapsed = _process_jiffies(), time.monotonic() - t0
    used = sorted(((j - procs0[pid][1]) / tick / elapsed, pid, name) for pid, (name, j) in procs1.items()
                  if pid in procs0 and pid != os.getpid())
    busiest = tuple(f"pid {pid} {_command(pid, name)} ({cores:.2f} cores)"
                    for cores, pid, name in reversed(used[-top:]) if cores >= 0.05)
    cores = (busy1 - busy0) / max(total1 - total0, 1) * (os.cpu_count() or 1)
    return LoadSample(os.getloadavg()[0], cores, busiest)


def load_verdict(before: LoadSample, after: LoadSample | None, own_threads: int) -> str | None:
    """Why a run counts as loaded, or None when it ran on an idle machine.

    Loaded: other processes kept more than BUSY_MAX cores busy in the sample just before the run (nothing of
    the benchmark runs then) or just after it (its processes have ended), or the 1-min load average after the
    run exceeds the benchmark's own threads by more than LOAD_EXCESS_MAX (a job that was runnable through
    much of the run's last minute). The load average before the run does not count: it still holds the
    previous benchmark's minute.
    """
    why = []
    if before.busy_cores > BUSY_MAX:
        why.append(f"other processes kept {before.busy_cores:.2f} cores busy before the run"
                   + (f": {', '.join(before.top)}" if before.top else ""))
    if after is not None:
        if after.busy_cores > BUSY_MAX:
            why.append(f"other processes kept {after.busy_cores:.2f} cores busy after the run"
                       + (f": {', '.join(after.top)}" if after.top else ""))
        if after.load1 - own_threads > LOAD_EXCESS_MAX:
            why.append(f"1-min load average {after.load1:.1f} after the run, where its own {own_threads} "
                       f"thread(s) account for at most {own_threads}")
    return "; ".join(why) or None


@dataclass
class IdleGuard:
    """Samples the machine before and after a speed benchmark and refuses or flags a loaded run.

    ``start()`` exits with status 2 and one line naming the busiest processes when the machine is loaded,
    unless ``allow_loaded``; ``finish()`` samples again after the run. ``footer(guard, cmd)`` states both
    samples and, for a loaded run, "LOADED (load x.y before, z.w after)".
    """

    allow_loaded: bool
    own_threads: int
    before: LoadSample | None = None
    after: LoadSample | None = None

    def start(self) -> IdleGuard:
        self.before = sample_load()
        why = load_verdict(self.before, None, self.own_threads)
        if why and not self.allow_loaded:
            print(f"refusing to benchmark a loaded machine (load {self.before.load1:.1f}): {why}. Rerun when it "
                  "is idle, or pass --allow-loaded to measure anyway (tables marked LOADED).", file=sys.stderr)
            sys.exit(2)
        return self

    def finish(self) -> bool:
        """Sample after the run; False (and one line on stderr) when it turned out loaded without
        ``allow_loaded``: the caller then prints its table but writes no doc and exits with status 2."""
        self.after = sample_load()
        why = self.verdict
        if why and not self.allow_loaded:
            print(f"the machine was loaded during the run ({why}): not writing the doc; rerun when it is idle, "
                  "or pass --allow-loaded", file=sys.stderr)
            return False
        return True

    @property
    def verdict(self) -> str | None:
        return load_verdict(self.before, self.after, self.own_threads)

    def note(self) -> str:
        """The footer's sentence on the machine's load (``start()`` must have run)."""
        b, a = self.before, self.after
        load = f"load {b.load1:.1f} before" + (f", {a.load1:.1f} after" if a else "")
        busy = f"other processes kept {b.busy_cores:.2f} cores busy before the run" + (
            f" and {a.busy_cores:.2f} after" if a else "")
        why = self.verdict
        if why:
            return f"**LOADED ({load})**: {why}; these numbers are not comparable with an idle machine's."
        return (f"idle by the benchmark's check: {busy} (1-min {load}, which includes the benchmark's own "
                f"{self.own_threads} thread(s)).")


def footer(load: float | IdleGuard, cmd: str) -> list[str]:
    """The closing lines of a generated section: where it ran, how loaded the machine was, how to rerun it.

    ``load`` is the speed benchmarks' :class:`IdleGuard`, or for the others the 1-min load average at the start.
    """
    state = (load.note() if isinstance(load, IdleGuard)
             else f"1-min load average {load:.1f} when the run started (other jobs shared the cores).")
    return ["", f"Machine: {machine()}; {state}", "", f"Command: `{cmd}`"]


# ---------------------------------------------------------------- the speed benchmarks' command lines
def doc_options(p) -> None:
    """Where a speed benchmark writes its table, and whether it may measure a loaded machine."""
    p.add_argument("--doc", default="docs/performance.md", help="'' to skip writing")
    p.add_argument("--allow-loaded", action="store_true",
                   help="measure even when other processes load the machine (the table then says LOADED)")


def engine_options(p, *, batch: str, tokens: int, rounds: int, rounds_help: str) -> None:
    """The options of the benchmarks that time vLLM engines (serve_speed, e2e_decode, peers)."""
    p.add_argument("--batch", default=batch, type=lambda s: [int(b) for b in s.split(",")],
                   help="comma-separated batch sizes (prompts per generate() call)")
    p.add_argument("--tokens", type=int, default=tokens, help="output tokens per prompt")
    p.add_argument("--repeats", type=int, default=2, help="timed generate() calls per measurement (best counts)")
    p.add_argument("--rounds", type=int, default=rounds, help=rounds_help)
    doc_options(p)


def check_engine_options(p, args) -> None:
    if args.tokens < 2:
        p.error(f"--tokens {args.tokens}: at least 2 (decode tok/s counts the tokens after each prompt's first)")


def publish(args, section: str, render) -> None:
    """Close the idle guard, then print ``render()``'s table and write it into ``args.doc`` only if the machine
    stayed idle; a loaded run exits with status 2 (the table is printed, marked LOADED)."""
    idle = args.load.finish()
    md = render()
    if args.doc and idle:
        write_section(args.doc, section, md)
    print(md)
    if not idle:
        sys.exit(2)
