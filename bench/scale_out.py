#!/usr/bin/env python
"""Replicas behind vllm-router on this machine (deploy/cluster.py), at full size on the default model.

    python bench/scale_out.py fault      # kill -9 one of 3 replicas under 32 streams, restart it
    python bench/scale_out.py drain      # SIGTERM one of 3 replicas under 32 streams
    python bench/scale_out.py affinity   # 16 sessions x 6 turns: cache_aware against round_robin
    python bench/scale_out.py scaling    # 1 replica against N replicas sharing the cores

Every scenario starts its own replicas and router on loopback ports and stops them after.
Figures go to stdout and, with --json, to a file (README "Scaling out" quotes them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from cluster import Cluster  # noqa: E402

PORT = 8400
TOPICS = ("a lighthouse", "a dragon", "a robot", "the sea", "a city at night", "a forest", "a train", "winter")


@dataclass
class Result:
    """One streamed request as its client saw it (times from the scenario's start, seconds)."""

    sent: float
    status: int = 0
    first_byte: float | None = None  # response headers
    first_token: float | None = None
    end: float | None = None
    tokens: int = 0
    done: bool = False
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.sent


async def stream(http: aiohttp.ClientSession, url: str, body: dict, t0: float) -> Result:
    r = Result(sent=time.monotonic() - t0)
    try:
        async with http.post(url + "/v1/chat/completions", json={**body, "stream": True}) as resp:
            r.status, r.first_byte = resp.status, time.monotonic() - t0
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return r
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.strip() == b"data: [DONE]":
                    r.done = r.error is None
                    break
                event = orjson.loads(line[6:])
                if "error" in event:
                    r.error = event["error"].get("message", "error event")
                elif event.get("choices") and event["choices"][0]["delta"].get("content"):
                    r.tokens += 1
                    if r.first_token is None:
                        r.first_token = time.monotonic() - t0
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        r.error = f"{type(exc).__name__}: {exc}"
    r.end = time.monotonic() - t0
    return r


async def closed_loop(http: aiohttp.ClientSession, url: str, clients: int, seconds: float, t0: float,
                      max_tokens: int = 128) -> list[Result]:
    """`clients` streams, each sending its next request when the last ends, for `seconds`."""
    results: list[Result] = []

    async def client(i: int) -> None:
        n = 0
        while time.monotonic() - t0 < seconds:
            body = {"messages": [{"role": "user", "content": f"Write a story about {TOPICS[(i + n) % len(TOPICS)]}."}],
                    "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.7}
            results.append(await stream(http, url, body, t0))
            n += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return results


async def scrape(http: aiohttp.ClientSession, url: str, name: str) -> float:
    try:
        async with http.get(url + "/metrics") as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return 0.0
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summary(results: list[Result], seconds: float) -> dict:
    ok = [r for r in results if r.done]
    lost_started = [r for r in results if not r.done and r.status == 200]
    lost_unstarted = [r for r in results if not r.done and r.status != 200]
    return {"requests": len(results), "completed": len(ok),
            "cut_while_streaming": len(lost_started), "lost_before_any_byte": len(lost_unstarted),
            "errors": sorted({(r.error or "")[:120] for r in results if not r.done}),
            "output_tok_per_s": round(sum(r.tokens for r in ok) / seconds, 1),
            "ttft_p50_s": p50([r.ttft for r in ok if r.ttft is not None])}


def cluster(args: argparse.Namespace, policy: str, replicas: int = 3, **kw) -> Cluster:
    return Cluster(replicas, policy, PORT, ["--shutdown-timeout", "60", *args.serve_args], router_args=args.router_args,
                   log_dir=Path(args.log_dir) / f"{policy}-{replicas}" if args.log_dir else None, **kw)


# ---------------------------------------------------------------------------- scenarios


async def fault(args: argparse.Namespace, sig: signal.Signals) -> dict:
    """32 closed-loop streams on 3 replicas; at 15 s replica 0 gets `sig`; killed, it is restarted at 30 s."""
    seconds, hit_at, restart_at = 60.0, 15.0, 30.0
    with cluster(args, "round_robin") as c:
        victim = c.replicas[0]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
            t0 = time.monotonic()
            load = asyncio.create_task(closed_loop(http, c.url, 32, seconds, t0))
            await asyncio.sleep(hit_at)
            victim.signal(sig)
            back_in: float | None = None
            if sig == signal.SIGKILL:
                victim.wait(10)
                await asyncio.sleep(restart_at - hit_at)
                await asyncio.to_thread(c.restart, 0)
                ready = time.monotonic() - t0
                while back_in is None and time.monotonic() - t0 < seconds:
                    if await scrape(http, victim.url, "aserve:prompt_tokens_total") > 0:  # admitted one
                        back_in = round(time.monotonic() - t0 - ready, 1)
                    await asyncio.sleep(0.2)
            else:
                exit_code = await asyncio.to_thread(victim.wait, 120)
            results = await load
    out = {"scenario": f"{sig.name} replica 0 of 3 at {hit_at:.0f} s, 32 streams, round_robin",
           **summary(results, seconds)}
    hit = [r for r in results if r.sent < hit_at < (r.end or seconds)]
    out["in_flight_at_the_signal"] = len(hit)
    if sig == signal.SIGKILL:
        out["restarted_replica_took_requests_after_s"] = back_in
    else:
        out["drained_replica_exit_code"] = exit_code
    return out


AFFINITY_SYSTEM = ("You are the assistant of a small bookshop. The shop opens at nine and closes at six, "
                   "sells new and second-hand books, orders any book in print within three days, and runs a "
                   "reading club on the first Tuesday of each month. ")


async def affinity(args: argparse.Namespace, policy: str, sessions: int = 16, turns: int = 6) -> dict:
    """Each session resends its whole history each turn; all sessions run at once."""
    with cluster(args, policy) as c:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            t0 = time.monotonic()
            by_turn: list[list[float]] = [[] for _ in range(turns)]
            failures = 0

            async def session(s: int) -> None:
                nonlocal failures
                # A long, session-specific opening, as a pasted document or a long system prompt is.
                history = [{"role": "system", "content": AFFINITY_SYSTEM * 8 + f"Customer number {s}."}]
                for turn in range(turns):
                    history.append({"role": "user", "content": f"Question {turn + 1} from customer {s}: "
                                                                f"tell me about {TOPICS[(s + turn) % len(TOPICS)]}."})
                    r = await stream(http, c.url, {"messages": history, "max_tokens": 48, "temperature": 0,
                                                   "ignore_eos": True}, t0)
                    if not r.done:
                        failures += 1
                        return
                    by_turn[turn].append(r.ttft)
                    history.append({"role": "assistant", "content": f"(answer {turn + 1})"})

            await asyncio.gather(*(session(s) for s in range(sessions)))
            queries = sum([await scrape(http, r.url, "aserve:prefix_cache_queries_total") for r in c.replicas])
            hits = sum([await scrape(http, r.url, "aserve:prefix_cache_hits_total") for r in c.replicas])
    later = [t for turn in by_turn[1:] for t in turn]
    return {"scenario": f"{sessions} sessions x {turns} turns, 3 replicas, {policy}", "failures": failures,
            "prefix_cache_hit_rate": round(hits / queries, 3) if queries else 0.0,
            "ttft_p50_turn1_s": p50(by_turn[0]), "ttft_p50_turns2to6_s": p50(later)}


async def scaling(args: argparse.Namespace) -> list[dict]:
    """The same closed loop (32 streams, 128 tokens) on 1 replica with every core (straight to it, then
    through the router), on 1 replica with one core, and on 2 replicas with one core each."""
    cores = os.cpu_count() or 1
    rows = []
    for replicas, threads, routed in ((1, cores, False), (1, cores, True), (1, 1, True), (2, 1, True)):
        with cluster(args, "round_robin", replicas, threads_per_replica=threads) as c:
            url = c.url if routed else c.replicas[0].url
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
                await closed_loop(http, url, 4, 5.0, time.monotonic(), 16)  # warm-up
                t0 = time.monotonic()
                results = await closed_loop(http, url, 32, args.seconds, t0)
        s = summary(results, args.seconds)
        rows.append({"replicas": replicas, "threads_each": threads, "through_router": routed,
                     "output_tok_per_s": s["output_tok_per_s"],
                     "per_replica": round(s["output_tok_per_s"] / replicas, 1),
                     "per_core": round(s["output_tok_per_s"] / (replicas * threads), 1),
                     "ttft_p50_s": s["ttft_p50_s"], "failed": s["requests"] - s["completed"]})
    return rows


def main() -> int:
    argv = sys.argv[1:]
    serve_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, serve_args = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=("fault", "drain", "affinity", "scaling", "all"))
    parser.add_argument("--seconds", type=float, default=30.0, help="scaling: seconds of load per configuration")
    parser.add_argument("--log-dir", default=None)
    parser.add_argument("--router-args", default="", help="more vllm-router flags, one string")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--policies", nargs="+", default=["round_robin", "cache_aware"], help="affinity: policies")
    args = parser.parse_args(argv)
    args.serve_args = serve_args
    args.router_args = args.router_args.split()
    out: dict = {}
    todo = ("fault", "drain", "affinity", "scaling") if args.scenario == "all" else (args.scenario,)
    for name in todo:
        if name == "fault":
            out["fault"] = asyncio.run(fault(args, signal.SIGKILL))
        elif name == "drain":
            out["drain"] = asyncio.run(fault(args, signal.SIGTERM))
        elif name == "affinity":
            out["affinity"] = [asyncio.run(affinity(args, p)) for p in args.policies]
        else:
            out["scaling"] = asyncio.run(scaling(args))
        print(json.dumps({name: out[name]}, indent=2), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
