"""A bounded soak of the real `vllm serve CKPT --quantization armor` on loopback (issue 21): errors, health, memory.

    python -m benchmarks.soak [--model CKPT] [--requests 500] [--concurrency 32] [--out out/soak.json]

What it does, in order: an ARMOR checkpoint of the default model (the serving benchmarks' one,
`out/perf/armor`, reused when unchanged; or --model), `vllm serve` with a stated --max-model-len,
a short warm-up, then

1. before: fixed greedy prompts, one at a time → outputs A;
2. the soak: --requests requests through `openai.AsyncOpenAI` at --concurrency, completions and
   chat, half streamed, a fifth cancelled midway (a stream closed after a few chunks; a plain
   request abandoned by a client-side timeout, which closes its connection), prompt lengths
   log-uniform from a few tokens up to the context limit and a few exactly at it (prompt +
   max_tokens = max_model_len, counted with the checkpoint's tokenizer and checked against the
   server's usage), small max_tokens;
3. after: /health, then the greedy prompts again → outputs B, which must equal A.

The resident memory of the server's process tree (API server + engine core, RSS summed; shared
pages count once per process) is sampled every second. Exits non-zero on any unexpected error
(5xx or otherwise), a failed /health, a dead server or A ≠ B.

Why the A/B prompts are short raw completions, sent one at a time: each request then runs alone
(the batch never changes its arithmetic) and is shorter than one KV block, so the prefix cache
never serves part of it; any difference between A and B is state the soak left behind.
Not in `make test`: it takes minutes to tens of minutes on a small CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from converters.data import wiki_split
from converters.commands.default_model import default_model_dir
from converters.commands.reuse import convert_once
from converters.commands.serving import VllmServer

from .common import footer, write_section
from .run_all import PERF_ARMOR
from .serve_speed import PROMPTS

NAME = "armor"


@dataclass(frozen=True)
class SoakConfig:
    requests: int = 500
    concurrency: int = 32
    max_model_len: int = 2048
    stream_share: float = 0.5
    cancel_share: float = 0.2
    at_limit: int = 8  # requests with prompt + max_tokens == max_model_len exactly
    max_tokens: tuple[int, int] = (4, 16)  # uniform range for requests that run to the end
    cancel_max_tokens: int = 64  # long enough that the cancel lands while the request is still running
    greedy_prompts: int = 8
    greedy_tokens: int = 24
    threads: int = 0  # OpenMP threads of the engine (0: vLLM's default, all cores)
    seed: int = 0


@dataclass
class Request:
    i: int
    endpoint: str  # "completions" (token ids) or "chat" (text through the chat template)
    stream: bool
    cancel: bool
    prompt: list[int] | list[dict]
    prompt_tokens: int  # counted here with the checkpoint's tokenizer
    max_tokens: int
    temperature: float
    cancel_after: float  # chunks (streamed) or seconds (not streamed)
    at_limit: bool = False


@dataclass
class Outcome:
    i: int
    status: str  # completed | cancelled | late_cancel (finished before the cancel) | server_error | client_error
    seconds: float
    completion_tokens: int = 0
    server_prompt_tokens: int | None = None
    error: str = ""


def plan(cfg: SoakConfig, tok, ids: list[int]) -> list[Request]:
    """The soak's requests, fixed by cfg.seed: endpoint, streaming, cancel, length, max_tokens for each."""
    rng = random.Random(cfg.seed)
    n = cfg.requests
    stream = set(rng.sample(range(n), round(n * cfg.stream_share)))
    cancel = set(rng.sample(range(n), round(n * cfg.cancel_share)))
    at_limit = set(rng.sample(sorted(set(range(n)) - cancel), cfg.at_limit))
    overhead = len(chat_ids(tok, ""))
    reqs = []
    for i in range(n):
        endpoint = "chat" if i % 2 else "completions"
        max_tokens = cfg.cancel_max_tokens if i in cancel else rng.randint(*cfg.max_tokens)
        room = cfg.max_model_len - max_tokens
        length = room if i in at_limit else round(math.exp(rng.uniform(math.log(4), math.log(room))))
        start = rng.randrange(len(ids) - length)
        if endpoint == "completions":
            prompt, count = ids[start:start + length], length
        else:  # fill the template to `length` tokens; text round-trips can shift the count, so measure and trim
            body = max(length - overhead, 1)
            while True:
                prompt = [{"role": "user", "content": tok.decode(ids[start:start + body])}]
                count = len(chat_ids(tok, prompt[0]["content"]))
                if count <= room or body == 1:
                    break
                body = max(body - (count - room), 1)
            if i in at_limit:
                max_tokens = cfg.max_model_len - count
        cancel_after = rng.randint(2, 4) if i in stream else rng.uniform(0.5, 5.0)
        reqs.append(Request(i, endpoint, i in stream, i in cancel, prompt, count, max_tokens,
                            rng.choice((0.0, 0.0, 0.7)), cancel_after, i in at_limit))
    return reqs


def chat_ids(tok, content: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def tree_rss(pid: int) -> tuple[int, int]:
    """(bytes resident summed over `pid` and its descendants, process count)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total, len(procs)


@dataclass
class RssLog:
    """RSS of the server's process tree once a second (a thread), plus named marks at phase boundaries."""
    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)
    marks: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), tree_rss(self.pid)[0]))
            self._stop.wait(1.0)

    def mark(self, name: str) -> None:
        self.marks[name] = tree_rss(self.pid)[0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


async def send(client, r: Request) -> Outcome:
    """One request as planned; the error classes decide server_error (5xx or an error event) vs client_error."""
    import openai

    t0 = time.monotonic()
    kw = dict(model=NAME, max_tokens=r.max_tokens, temperature=r.temperature)
    create = client.completions.create if r.endpoint == "completions" else client.chat.completions.create
    kw["prompt" if r.endpoint == "completions" else "messages"] = r.prompt
    try:
        if r.stream:
            chunks, usage = 0, None
            stream = await create(**kw, stream=True, stream_options={"include_usage": True})
            async for c in stream:
                usage = c.usage or usage
                chunks += bool(c.choices)
                if r.cancel and chunks >= r.cancel_after:
                    await stream.close()
                    return Outcome(r.i, "cancelled", time.monotonic() - t0)
        else:
            call = create(**kw)
            if r.cancel:
                try:
                    resp = await asyncio.wait_for(call, r.cancel_after)
                except TimeoutError:
                    return Outcome(r.i, "cancelled", time.monotonic() - t0)
            else:
                resp = await call
            usage = resp.usage
    except openai.APIStatusError as e:
        kind = "server_error" if e.status_code >= 500 else "client_error"
        return Outcome(r.i, kind, time.monotonic() - t0, error=f"{e.status_code}: {str(e)[:300]}")
    except openai.APIConnectionError as e:
        return Outcome(r.i, "client_error", time.monotonic() - t0, error=f"{type(e).__name__}: {str(e)[:300]}")
    except openai.APIError as e:  # an error event inside a stream: the server failed mid-request
        return Outcome(r.i, "server_error", time.monotonic() - t0, error=f"{type(e).__name__}: {str(e)[:300]}")
    status = "late_cancel" if r.cancel else "completed"
    return Outcome(r.i, status, time.monotonic() - t0, usage.completion_tokens if usage else 0,
                   usage.prompt_tokens if usage else None)


async def soak(server: VllmServer, reqs: list[Request], cfg: SoakConfig, rss: RssLog | None) -> list[Outcome]:
    """All of `reqs`, at most cfg.concurrency at a time; every 100 done, a progress line and an RSS mark."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=1800)
    gate, done, outcomes = asyncio.Semaphore(cfg.concurrency), [0], []

    async def one(r: Request):
        async with gate:
            outcomes.append(await send(client, r))
        done[0] += 1
        if rss and (done[0] % 100 == 0 or done[0] == len(reqs)):
            rss.mark(f"after {done[0]} requests")
            counts = {s: sum(o.status == s for o in outcomes) for s in ("completed", "cancelled", "server_error")}
            print(f"  {done[0]}/{len(reqs)} done: {counts}", flush=True)

    await asyncio.gather(*(one(r) for r in reqs))
    await client.close()
    return sorted(outcomes, key=lambda o: o.i)


def greedy_outputs(server: VllmServer, cfg: SoakConfig) -> list[str]:
    client = server.client()
    return [client.completions.create(model=NAME, prompt=p, max_tokens=cfg.greedy_tokens, temperature=0.0)
            .choices[0].text for p in PROMPTS[:cfg.greedy_prompts]]


def metrics(server: VllmServer) -> dict[str, float]:
    """A few of vLLM's Prometheus counters (summed over labels): preemptions show the KV cache ran out."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    want = ("vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
            "vllm:request_success_total")
    out = {}
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in want:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def run(model: Path, cfg: SoakConfig, log: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    ids = tok(wiki_split("test"), add_special_tokens=False)["input_ids"]
    reqs = plan(cfg, tok, ids)
    load_before = os.getloadavg()
    result = {"config": asdict(cfg), "model": str(model), "load_before": load_before, "cpus": os.cpu_count()}
    # unpinned threads: vLLM's default pinning crawls when other jobs share the cores
    env = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind")}
    if cfg.threads:  # two OpenMP threads on oversubscribed cores stall at every barrier (README, make demo)
        env["OMP_NUM_THREADS"] = str(cfg.threads)
    t_start = time.monotonic()
    with VllmServer(model, log, max_model_len=cfg.max_model_len, env=env, name=NAME) as server:
        result["startup_s"] = time.monotonic() - t_start
        rss = RssLog(server.proc.pid)
        try:
            warm = [r for r in reqs if not r.cancel][:4]
            asyncio.run(soak(server, warm, cfg, None))
            a = greedy_outputs(server, cfg)
            rss.mark("start")
            t0 = time.monotonic()
            outcomes = asyncio.run(soak(server, reqs, cfg, rss))
            result["soak_s"] = time.monotonic() - t0
            result["healthy_after"] = server.healthy()
            b = greedy_outputs(server, cfg)
            time.sleep(5)  # let the engine settle before the last reading
            rss.mark("end")
            result["metrics"] = metrics(server)
        finally:
            rss.close()
        result["alive_after"] = server.proc.poll() is None
    soak_samples = [v for t, v in rss.samples if t >= t0]
    result.update(greedy_a=a, greedy_b=b, same_outputs=a == b, rss_marks=rss.marks,
                  rss_peak=max(soak_samples, default=0), rss_growth=rss.marks["end"] - rss.marks["start"],
                  outcomes=[asdict(o) for o in outcomes], load_after=os.getloadavg())
    by_i = {r.i: r for r in reqs}
    done = [o for o in outcomes if o.status in ("completed", "late_cancel")]
    result["prompt_count_mismatch"] = [(o.i, by_i[o.i].prompt_tokens, o.server_prompt_tokens) for o in done
                                       if o.server_prompt_tokens is not None
                                       and o.server_prompt_tokens != by_i[o.i].prompt_tokens]
    result["at_limit_completed"] = sum(by_i[o.i].at_limit for o in done)
    result["log_errors"] = [ln for ln in log.read_text(errors="replace").splitlines()
                            if " ERROR " in ln or "Traceback" in ln][:20]
    return result


def counts(res: dict) -> dict[str, int]:
    statuses = [o["status"] for o in res["outcomes"]]
    return {s: statuses.count(s) for s in ("completed", "cancelled", "late_cancel", "client_error", "server_error")}


def failures(res: dict) -> list[str]:
    c, why = counts(res), []
    if c["server_error"]:
        why.append(f"{c['server_error']} server errors")
    if c["client_error"]:
        why.append(f"{c['client_error']} client-side errors (every request was valid)")
    if not (res["healthy_after"] and res["alive_after"]):
        why.append("server not healthy after the soak")
    if not res["same_outputs"]:
        why.append("greedy outputs differ before and after")
    if res["prompt_count_mismatch"]:
        why.append(f"{len(res['prompt_count_mismatch'])} prompts counted differently by the server")
    return why


def markdown(res: dict, cmd: str) -> str:
    cfg, c = res["config"], counts(res)
    reqs = cfg["requests"]
    lat = sorted(o["seconds"] for o in res["outcomes"] if o["status"] == "completed")
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    m, marks = res["metrics"], res["rss_marks"]
    late = marks["end"] - marks.get("after 100 requests", marks["start"])  # once the allocators have warmed up
    steps = ", ".join(f"{k.removeprefix('after ')}: {mib(v)}" for k, v in marks.items() if k.startswith("after "))
    lines = [
        f"## Soak: {reqs} requests against vllm serve", "",
        f"`vllm serve` on loopback with the ARMOR checkpoint of the default model (`sparse_cpu`), fp32, eager, "
        f"`--max-model-len {cfg['max_model_len']}`, `VLLM_CPU_KVCACHE_SPACE=1`, "
        f"{cfg['threads'] or 'all'} OpenMP thread(s), unpinned. {reqs} requests "
        f"through `openai.AsyncOpenAI` at concurrency {cfg['concurrency']}: completions (token ids) and chat "
        f"alternately, {cfg['stream_share']:.0%} streamed, {cfg['cancel_share']:.0%} cancelled midway (streams "
        f"closed after 2–4 chunks; plain requests abandoned after 0.5–5 s), prompts log-uniform from 4 tokens to the "
        f"limit with {cfg['at_limit']} exactly at it (prompt + max_tokens = {cfg['max_model_len']}), max_tokens "
        f"{cfg['max_tokens'][0]}–{cfg['max_tokens'][1]} ({cfg['cancel_max_tokens']} for the cancelled ones), "
        f"temperature 0 or 0.7. Before and after: {cfg['greedy_prompts']} short greedy completions of "
        f"{cfg['greedy_tokens']} tokens, one at a time.", "",
        "| what | result |", "|---|---|",
        f"| completed | {c['completed']} (+{c['late_cancel']} meant to be cancelled that finished first) |",
        f"| cancelled midway | {c['cancelled']} |",
        f"| client-side errors | {c['client_error']} |",
        f"| server errors (5xx or error events) | {c['server_error']} |",
        f"| ERROR lines in the server log | {len(res['log_errors'])} |",
        f"| /health after, server alive | {res['healthy_after']}, {res['alive_after']} |",
        f"| greedy outputs after = before | {res['same_outputs']} ({cfg['greedy_prompts']} prompts) |",
        f"| prompts at the limit that completed; token counts = server's | {res['at_limit_completed']}; "
        f"{not res['prompt_count_mismatch']} |",
        f"| prompt / generated tokens (server counters) | {m.get('vllm:prompt_tokens_total', 0):.0f} / "
        f"{m.get('vllm:generation_tokens_total', 0):.0f} |",
        f"| preemptions (KV cache full) | {m.get('vllm:num_preemptions_total', 0):.0f} |",
        f"| latency of completed requests, p50 / p95 | {pct(0.5):.1f} s / {pct(0.95):.1f} s |",
        f"| soak wall time | {res['soak_s'] / 60:.1f} min (server start-up {res['startup_s']:.0f} s) |",
        f"| RSS of the server tree: start / peak / end | {mib(marks['start'])} / {mib(res['rss_peak'])} / "
        f"{mib(marks['end'])} |",
        f"| RSS growth, start → end | {res['rss_growth'] / 2**20:+.0f} MiB ({res['rss_growth'] / marks['start']:+.1%}) |",
        f"| RSS growth, after the first 100 requests → end | {late / 2**20:+.0f} MiB |",
        f"| RSS after each 100 requests | {steps} |", "",
        "RSS = resident set of the API server and every process under it (engine core, worker), summed (`psutil`), "
        "sampled every second; start is after a warm-up of 4 requests and the first greedy pass, end 5 s after the "
        "last greedy pass. "
        f"Load average (1 min) {res['load_before'][0]:.1f} before, {res['load_after'][0]:.1f} after."]
    return "\n".join(lines + footer(res["load_before"][0], cmd))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="an ARMOR checkpoint (default: make or reuse out/perf/armor, --preset quick)")
    p.add_argument("--requests", type=int, default=SoakConfig.requests)
    p.add_argument("--concurrency", type=int, default=SoakConfig.concurrency)
    p.add_argument("--max-model-len", type=int, default=SoakConfig.max_model_len)
    p.add_argument("--max-tokens", default="4,16", help="range of max_tokens for requests that run to the end")
    p.add_argument("--at-limit", type=int, default=SoakConfig.at_limit, help="requests exactly at the context limit")
    p.add_argument("--threads", type=int, default=0, help="OpenMP threads of the engine (default: vLLM's)")
    p.add_argument("--seed", type=int, default=SoakConfig.seed)
    p.add_argument("--out", default="out/soak.json", help="the full result as JSON")
    p.add_argument("--log", default="out/soak-vllm-serve.log", help="the server's output")
    p.add_argument("--doc", default="docs/performance.md", help="'' to skip writing")
    a = p.parse_args()
    lo, hi = (int(x) for x in a.max_tokens.split(","))
    cfg = SoakConfig(requests=a.requests, concurrency=a.concurrency, max_model_len=a.max_model_len,
                     max_tokens=(lo, hi), at_limit=a.at_limit, threads=a.threads, seed=a.seed)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the server's process group is stopped
    load = os.getloadavg()[0]
    if load > 0.75 * os.cpu_count():
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs; other jobs will slow the soak", flush=True)
    model = Path(a.model) if a.model else None
    if model is None:
        convert_once([str(default_model_dir()), *PERF_ARMOR])
        model = Path(PERF_ARMOR[0])
    res = run(model, cfg, Path(a.log))
    res["failures"] = failures(res)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    md = markdown(res, shlex.join(["python", "-m", "benchmarks.soak", *sys.argv[1:]]))
    if a.doc:
        write_section(a.doc, "soak_serve_cpu", md)
    print(md)
    for i, (x, y) in enumerate(zip(res["greedy_a"], res["greedy_b"])):
        if x != y:
            print(f"greedy prompt {i} ({PROMPTS[i]!r}):\n  before {x!r}\n  after  {y!r}")
    if res["failures"]:
        raise SystemExit("soak failed: " + "; ".join(res["failures"]))


if __name__ == "__main__":
    main()
