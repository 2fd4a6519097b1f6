"""The speed benchmarks' guards: when a run counts as loaded (benchmarks/common.py) and what its footer says, and
how the peer table pairs its rounds (benchmarks/peers.py)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from benchmarks.common import (BUSY_MAX, LOAD_EXCESS_MAX, IdleGuard, LoadSample, cpu_jiffies, footer, load_verdict,
                               sample_load)
from benchmarks.peers import Engine, rows

IDLE = LoadSample(load1=1.4, busy_cores=0.05)  # a previous run's minute still in the load average: idle all the same


def test_idle_before_and_after_is_not_loaded():
    assert load_verdict(IDLE, None, own_threads=2) is None
    assert load_verdict(IDLE, LoadSample(load1=2.3, busy_cores=0.1), own_threads=2) is None


def test_busy_before_names_the_processes():
    busy = LoadSample(load1=0.2, busy_cores=BUSY_MAX + 0.1, top=("pid 7 `make test` (0.40 cores)",))
    why = load_verdict(busy, None, own_threads=1)
    assert why is not None and "before the run" in why and "`make test`" in why


def test_busy_after_or_load_above_own_threads_is_loaded():
    assert "after the run" in load_verdict(IDLE, LoadSample(load1=1.0, busy_cores=BUSY_MAX + 0.01), own_threads=1)
    # a job that kept one core's worth of runnable work through the run: load = own threads + 1
    why = load_verdict(IDLE, LoadSample(load1=3.0, busy_cores=0.0), own_threads=2)
    assert why is not None and "1-min load average 3.0" in why
    assert load_verdict(IDLE, LoadSample(load1=2 + LOAD_EXCESS_MAX - 0.01, busy_cores=0.0), own_threads=2) is None


def test_cpu_jiffies_counts_steal_but_not_idle_or_iowait():
    busy, total = cpu_jiffies("cpu  100 0 50 800 40 5 5 10 0 0\ncpu0 50 0 25 400 20 2 3 5 0 0\n")
    assert (busy, total) == (170, 1010)


def test_footer_flags_a_loaded_run_and_states_an_idle_one():
    loaded = IdleGuard(allow_loaded=True, own_threads=1, before=LoadSample(2.04, 1.9, ("pid 9 `x` (1.90 cores)",)),
                       after=LoadSample(3.3, 1.8))
    text = "\n".join(footer(loaded, "python -m benchmarks.e2e_decode"))
    assert "LOADED (load 2.0 before, 3.3 after)" in text and "pid 9" in text
    idle = IdleGuard(allow_loaded=False, own_threads=2, before=IDLE, after=LoadSample(1.9, 0.02))
    text = "\n".join(footer(idle, "cmd"))
    assert "LOADED" not in text and "0.05 cores busy before the run and 0.02 after" in text
    assert "load average 0.7 when the run started" in "\n".join(footer(0.7, "cmd"))  # the non-speed benchmarks


def test_start_refuses_a_loaded_machine_with_status_2(monkeypatch, capsys):
    monkeypatch.setattr("benchmarks.common.sample_load", lambda: LoadSample(2.0, 1.95, ("pid 1 `lead` (1.95 cores)",)))
    with pytest.raises(SystemExit) as exit_:
        IdleGuard(allow_loaded=False, own_threads=1).start()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pid 1 `lead`" in err and "--allow-loaded" in err
    assert IdleGuard(allow_loaded=True, own_threads=1).start().before.busy_cores == 1.95


def test_sample_load_reads_this_machine():
    s = sample_load(0.3)
    assert 0 <= s.busy_cores <= (os.cpu_count() or 1) + 0.2 and s.load1 >= 0
    assert all(t.startswith("pid ") and t.endswith(" cores)") for t in s.top)


def _run(decode: float, prefill: float, linear_bytes: int) -> dict:
    """One engine's result of one round, as serve_speed's worker reports it."""
    return {"speed": {"1": {"decode_tok_s": decode}}, "prefill": {"tok_s": prefill}, "bytes": linear_bytes + 400e6,
            "module_bytes": {"model.layers.0.mlp.down_proj": linear_bytes, "model.embed_tokens": 400e6}}


def test_peer_ratios_are_medians_of_paired_rounds_and_a_failed_engine_says_why():
    engines = [Engine("dense bf16", "bf16", Path("d")), Engine("ARMOR bf16", "2:4", Path("a"), "sparse_cpu"),
               Engine("W4A16 int4", "GPTQ", Path("g"))]
    # round 2 ran at half speed for everyone: paired, ARMOR is 1.2x in rounds 1 and 2 (1.1x in round 3);
    # the ratio of the medians would say 11 / 10 = 1.1x
    runs = {"dense bf16": [_run(10, 100, 1e9), _run(5, 50, 1e9), _run(10, 100, 1e9)],
            "ARMOR bf16": [_run(12, 90, 6e8), _run(6, 45, 6e8), _run(11, 95, 6e8)]}
    table = rows(engines, runs, {"W4A16 int4": "no AVX-512"}, 2, argparse.Namespace(batch=[1]))
    assert table[0] == "| 2 | dense bf16 | bf16 | 10.00 | 100.00 | 1000 | 1400 |"
    assert table[1] == "| 2 | ARMOR bf16 | 2:4 | 11.00 (1.20×) | 90.00 (0.90×) | 600 (0.60×) | 1000 (0.71×) |"
    assert table[2] == "| 2 | W4A16 int4 | GPTQ | not run: no AVX-512 | – | – | – |"
    assert all(r.count("|") == table[0].count("|") for r in table)
