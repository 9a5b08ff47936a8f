"""Bounded soak: mixed chat load for N minutes, then check that nothing leaked or ended silently.

Closed-loop clients (default: as many as the server's KV slots, i.e. max_num_seqs) send load.py's
prompts (short and long), half of them streamed, with max_tokens drawn from [8, --max-tokens].
--cancel-fraction of them are dropped by the client at a random moment: queued (within 50 ms),
early (after the first chunk; non-streams 0.05-0.5 s) or mid (after a random number of chunks;
non-streams 0.5-3 s). At the deadline no new request is sent; those still running get
--drain-seconds, then are cut. Afterwards /health must show every KV slot free and nothing
running or waiting. Exit status 1 if a stream ended without [DONE] and without an error event,
or the KV cache is not free afterwards. Talks only to 127.0.0.1.

    python bench/soak.py --minutes 1 --concurrency 8 --json bench/results/soak.json  # starts aserve
    python bench/soak.py --url http://127.0.0.1:8000 --pid "$(pgrep -f 'aserve serve')"
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import PROMPTS  # noqa: E402  (bench/load.py: short questions, two long prompts, one Chinese)
from memory import rss_mib  # noqa: E402
from sweep import Server, Target, start_command  # noqa: E402


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0  # streams ended by [DONE] after a finish_reason, or valid chat.completion bodies
    completed_streams: int = 0
    completion_tokens: int = 0
    cancelled: dict[str, int] = field(default_factory=dict)  # by us, by moment: queued, early, mid
    cut_at_end: int = 0  # still running after --drain-seconds
    errors: dict[str, int] = field(default_factory=dict)  # "http 503 TYPE/CODE", "stream_error TYPE/CODE", "connection X"
    silent_stream_ends: int = 0  # 200 streams that ended with neither [DONE] nor an error event: must be 0
    invalid_bodies: int = 0  # 200 non-stream bodies that are not a valid chat.completion

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def record(self, outcome: str, plan: Plan) -> None:
        if outcome == "cancelled":
            self.cancelled[plan.moment or "?"] = self.cancelled.get(plan.moment or "?", 0) + 1
        elif outcome == "done":
            self.completed += 1
            self.completed_streams += plan.stream
        elif outcome == "silent":
            self.silent_stream_ends += 1


@dataclass
class Plan:
    stream: bool
    max_tokens: int
    moment: str | None  # None: not cancelled
    cancel_after_chunks: int | None
    cancel_after_s: float | None


@dataclass
class Report:
    url: str
    server_pid: int | None
    concurrency: int
    load_s: float
    tally: Tally
    rss_start_mib: float | None
    rss_end_mib: float | None
    health_after: dict[str, Any]
    kv_free_after: bool


async def get_health(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=5)) as resp:
        return resp.status, await resp.json(content_type=None)


def plan_request(rng: random.Random, args: argparse.Namespace) -> Plan:
    stream, max_tokens = rng.random() < 0.5, rng.randint(8, args.max_tokens)
    moment = rng.choice(("queued", "early", "mid")) if rng.random() < args.cancel_fraction else None
    chunks = {"early": 1, "mid": rng.randint(2, max_tokens)}.get(moment or "") if stream else None
    delay = {"queued": rng.uniform(0, 0.05), "early": rng.uniform(0.05, 0.5), "mid": rng.uniform(0.5, 3)}
    return Plan(stream, max_tokens, moment, chunks, delay[moment] if moment and chunks is None else None)


def error_kind(prefix: str, body: bytes | dict[str, Any]) -> str:
    """'PREFIX type/code' from an OpenAI error body."""
    try:
        err = (json.loads(body) if isinstance(body, bytes) else body)["error"]
        return f"{prefix} {err['type']}/{err.get('code')}"
    except (ValueError, KeyError, TypeError):
        return f"{prefix} (not an OpenAI error body)"


def parse_completion(body: bytes) -> dict[str, Any] | None:
    """The body if it is a valid OpenAI chat.completion, else None."""
    try:
        obj = json.loads(body)
        choices, usage = obj["choices"], obj["usage"]
        ok = (obj["object"] == "chat.completion" and isinstance(obj["id"], str) and len(choices) > 0
              and all(c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str)
                      and c["finish_reason"] in ("stop", "length") for c in choices)
              and isinstance(usage["completion_tokens"], int))
        return obj if ok else None
    except (ValueError, KeyError, TypeError):
        return None


def read_event(data: str, tally: Tally) -> str:
    """One SSE data payload: 'done' ([DONE]), 'error' (an error event or bad JSON), 'finish' or 'chunk'."""
    if data == "[DONE]":
        return "done"
    try:
        event = json.loads(data)
    except ValueError:
        tally.error("stream bad JSON")
        return "error"
    if "error" in event:
        tally.error(error_kind("stream_error", event))
        return "error"
    tally.completion_tokens += (event.get("usage") or {}).get("completion_tokens", 0)
    return "finish" if any(c.get("finish_reason") for c in event.get("choices") or []) else "chunk"


async def read_stream(resp: aiohttp.ClientResponse, tally: Tally, cancel_after: int | None) -> str:
    """Reads SSE by lines to the end: 'done', 'error', 'cancelled' (by us) or 'silent'."""
    chunks, errored, finished = 0, False, False
    try:
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue  # blank separators and ': keep-alive' comments
            kind = read_event(line[5:].strip(), tally)
            if kind == "done":
                if not (errored or finished):
                    tally.error("stream [DONE] without finish_reason")
                return "done" if finished and not errored else "error"
            errored, finished, chunks = errored or kind == "error", finished or kind == "finish", chunks + 1
            if cancel_after is not None and chunks >= cancel_after and not finished:
                resp.close()  # drop the connection mid-stream
                return "cancelled"
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionError) as exc:  # body cut off
        tally.error(f"connection {type(exc).__name__} mid-stream")
    return "error" if errored else "silent"


async def send(session: aiohttp.ClientSession, url: str, i: int, plan: Plan, args: argparse.Namespace,
               tally: Tally) -> str:
    body = {"messages": list(PROMPTS[i % len(PROMPTS)]), "stream": plan.stream, "max_tokens": plan.max_tokens,
            "temperature": 0.8, "seed": i, "stream_options": {"include_usage": True} if plan.stream else None}
    async with session.post(url + "/v1/chat/completions", json=body, headers={"X-Request-Id": f"soak-{i}"},
                            timeout=aiohttp.ClientTimeout(total=args.request_timeout)) as resp:
        if resp.status != 200:
            tally.error(error_kind(f"http {resp.status}", await resp.read()))
            return "error"
        if plan.stream:
            return await read_stream(resp, tally, plan.cancel_after_chunks)
        completion = parse_completion(await resp.read())
        if completion is None:
            tally.invalid_bodies += 1
            return "error"
        tally.completion_tokens += completion["usage"]["completion_tokens"]
        return "done"


async def one_request(session: aiohttp.ClientSession, url: str, rng: random.Random, args: argparse.Namespace,
                      tally: Tally) -> None:
    plan, i = plan_request(rng, args), tally.sent
    tally.sent += 1
    task, dropped = asyncio.create_task(send(session, url, i, plan, args, tally)), False
    try:
        if plan.cancel_after_s is not None and not (await asyncio.wait({task}, timeout=plan.cancel_after_s))[0]:
            task.cancel()  # wherever it is: connecting, queued, prefilling, decoding
            dropped = True
        outcome = await task
    except asyncio.CancelledError:
        if not dropped:  # we are being cut at the end of the run
            task.cancel()
            raise
        outcome = "cancelled"
    except TimeoutError:
        tally.error("client timeout")
        outcome = "error"
    except (aiohttp.ClientError, OSError) as exc:
        tally.error(f"connection {type(exc).__name__}")
        outcome = "error"
    tally.record(outcome, plan)


async def wait_until_idle(session: aiohttp.ClientSession, url: str, seconds: float) -> tuple[dict[str, Any], bool]:
    """Polls /health until every KV block is free and nothing runs or waits (drops take effect at the
    engine's next step); returns the last /health body and whether that happened within `seconds`."""
    deadline, health = time.monotonic() + seconds, {}
    while time.monotonic() < deadline:
        try:
            status, health = await get_health(session, url)
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            status, health = 0, {"error": f"{type(exc).__name__}: {exc}"}
        if status == 200 and health.get("kv_blocks_free", -1) == health.get("kv_blocks_total") \
                and health.get("running") == health.get("waiting") == 0:
            return health, True
        await asyncio.sleep(0.1)
    return health, False


async def soak(args: argparse.Namespace, url: str, pid: int | None) -> Report:
    tally, rng = Tally(), random.Random(args.seed)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)  # a dropped request really closes its socket
    async with aiohttp.ClientSession(connector=connector) as session:
        concurrency = args.concurrency or (await get_health(session, url))[1]["max_num_seqs"]
        rss_start, t0 = rss(pid), time.monotonic()
        print(f"soak: {url} (pid {pid}), concurrency {concurrency}, {args.minutes:g} min", file=sys.stderr)

        async def client() -> None:
            while time.monotonic() < t0 + args.minutes * 60 and tally.sent < args.max_requests:
                await one_request(session, url, rng, args, tally)

        clients = [asyncio.create_task(client()) for _ in range(concurrency)]
        _, running = await asyncio.wait(clients, timeout=args.minutes * 60 + args.drain_seconds)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        tally.cut_at_end, load_s = len(running), time.monotonic() - t0
        health, kv_free = await wait_until_idle(session, url, args.settle_seconds)
    return Report(url, pid, concurrency, load_s, tally, rss_start, rss(pid), health, kv_free)


def rss(pid: int | None) -> float | None:
    return None if pid is None else rss_mib(pid)


async def soak_own_server(args: argparse.Namespace) -> Report:
    """Starts `aserve serve` on a free 127.0.0.1 port (sweep.py's Server), soaks it, stops it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command, url = start_command("aserve", f"{args.serve_args} --port {port}")
    async with Server(Target("aserve", url, command), args.server_log, 600) as server:
        report = await soak(args, url, server.proc.pid)
    print(f"server stopped, exit status {server.proc.returncode}", file=sys.stderr)
    return report


def print_report(r: Report) -> None:
    t = r.tally
    print(f"{r.load_s:.0f} s at concurrency {r.concurrency}: sent {t.sent}, completed {t.completed} "
          f"({t.completed_streams} streamed; {t.completion_tokens} completion tokens), "
          f"cancelled by us {sum(t.cancelled.values())} {t.cancelled}, cut at the end {t.cut_at_end}")
    print(f"errors: {sum(t.errors.values())} {t.errors}")
    print(f"streams ended silently (no [DONE], no error event): {t.silent_stream_ends}")
    print(f"invalid non-stream bodies: {t.invalid_bodies}")
    if r.rss_start_mib is not None and r.rss_end_mib is not None:
        print(f"server RSS: start {r.rss_start_mib:.1f} MiB, end {r.rss_end_mib:.1f} MiB "
              f"({r.rss_end_mib - r.rss_start_mib:+.1f})")
    print(f"/health after: {r.health_after} -> KV {'free' if r.kv_free_after else 'NOT FREE'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server, http://127.0.0.1:PORT (default: start `aserve serve`)")
    p.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")
    p.add_argument("--serve-args", default="", help="extra `aserve serve` arguments (write --serve-args=\"...\")")
    p.add_argument("--server-log", type=Path, default=Path("bench/results/soak-server.log"))
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=0, help="default: /health max_num_seqs")
    p.add_argument("--max-requests", type=int, default=100_000, help="send at most this many")
    p.add_argument("--max-tokens", type=int, default=128, help="each request draws max_tokens from [8, this]")
    p.add_argument("--cancel-fraction", type=float, default=0.2)
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request")
    p.add_argument("--drain-seconds", type=float, default=120.0, help="after the deadline, before cutting")
    p.add_argument("--settle-seconds", type=float, default=10.0, help="for the KV cache to become free")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = p.parse_args()
    if args.url and not args.url.startswith("http://127.0.0.1:"):
        p.error("--url must be http://127.0.0.1:PORT")
    if args.url:
        report = asyncio.run(soak(args, args.url.rstrip("/"), args.pid))
    else:
        report = asyncio.run(soak_own_server(args))
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report), indent=2, ensure_ascii=False))
    return 1 if report.tally.silent_stream_ends or not report.kv_free_after else 0


if __name__ == "__main__":
    sys.exit(main())
