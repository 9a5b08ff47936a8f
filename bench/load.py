#!/usr/bin/env python
"""Streaming load generator for an OpenAI-compatible chat server (aserve).

For each concurrency level N it runs N closed-loop streaming clients against
POST {url}/v1/chat/completions until the level's request budget is used up,
while a side task polls GET {url}/health every ~20 ms.  It reports throughput,
TTFT, inter-token latency, errors and /health latency per level, then the
throughput ratio between the highest and the lowest level.

Only stdlib + aiohttp + aiohttp-sse-client + orjson are used.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import orjson
from aiohttp_sse_client.client import READY_STATE_CONNECTING, EventSource

# ---------------------------------------------------------------------------
# Prompt set: fixed, varied, cycled deterministically (request i of a level
# uses PROMPTS[i % len(PROMPTS)]), so every run and every level sends the same
# mix.  Short questions dominate, two long prompts exercise prefill, one
# Chinese prompt exercises multi-byte detokenisation.
# ---------------------------------------------------------------------------
_LONG_PASSAGE = (
    "The printing press, developed by Johannes Gutenberg around 1440, combined "
    "movable metal type, oil-based inks and a screw press adapted from wine "
    "making. Before it, books were copied by hand, which made them scarce and "
    "expensive and allowed errors to accumulate with each copy. Within a few "
    "decades presses operated in more than two hundred European cities, and "
    "by 1500 they had produced millions of volumes. Cheaper books raised "
    "literacy, standardised spelling and grammar, let scientists share "
    "identical copies of diagrams and data, and helped spread the ideas of "
    "the Reformation faster than authorities could suppress them. Historians "
    "still debate how much of the later scientific revolution depended on "
    "this change in how information was reproduced and distributed."
)

PROMPTS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "What is the capital of France?"},),
    ({"role": "user", "content": "Name three primary colors."},),
    ({"role": "user", "content": "Explain what a hash table is in one sentence."},),
    ({"role": "user", "content": "Write a haiku about the sea."},),
    (
        {"role": "system", "content": "You are a concise, careful assistant."},
        {"role": "user", "content": "Summarise the following passage in three bullet points, "
                                    "then give one open question it raises.\n\n" + _LONG_PASSAGE},
    ),
    ({"role": "user", "content": "Why is the sky blue?"},),
    ({"role": "user", "content": "请用三句话介绍一下长城的历史。"},),
    (
        {"role": "system", "content": "You are a helpful programming tutor."},
        {"role": "user", "content": "I have a Python list of dictionaries, each with keys 'name', "
                                    "'age' and 'city'. Show how to group the people by city, sort "
                                    "each group by age descending, and print the oldest person per "
                                    "city. Explain each step briefly and mention the time "
                                    "complexity."},
        {"role": "assistant", "content": "Sure. Do you want a solution with only the standard library?"},
        {"role": "user", "content": "Yes, standard library only, please."},
    ),
    ({"role": "user", "content": "What is 17 times 23?"},),
)

# How many distinct error messages to keep per level (the count is always exact).
MAX_ERROR_MESSAGES = 5


# ---------------------------------------------------------------------------
# Result types
# ---------------------------------------------------------------------------
@dataclass
class RequestResult:
    """Timing of one streamed request.  Times are time.perf_counter() seconds."""

    index: int
    ok: bool
    error: str | None = None
    start: float = 0.0
    end: float = 0.0
    first_content: float | None = None
    last_content: float | None = None
    content_chunks: int = 0
    # Gaps between successive content-bearing chunks (len == content_chunks - 1).
    chunk_gaps: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    usage_reported: bool = False
    finish_reason: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_content is None else self.first_content - self.start

    @property
    def tpot(self) -> float | None:
        """Per-request mean time per output token after the first: (e2e - ttft)/(tokens-1)."""
        if self.first_content is None or self.completion_tokens < 2:
            return None
        return (self.end - self.first_content) / (self.completion_tokens - 1)

    def itl_samples(self) -> tuple[list[float], bool]:
        """Per-token inter-token latency samples and whether attribution is exact.

        The OpenAI chunk format does not say how many tokens a chunk carries.
        If the content-chunk count matches the usage token count (allowing one
        extra token for a stop/EOS token that produced no text), each chunk is
        one token and the gaps are exact per-token samples.  Otherwise the
        server coalesced tokens (e.g. held back an incomplete UTF-8 sequence)
        and each gap is divided by the request's mean tokens per gap,
        (tokens - 1) / (chunks - 1), which keeps the mean equal to the
        per-request TPOT but is only an approximation for individual gaps.
        """
        if self.content_chunks < 2:
            return [], True
        allowance = 1 if self.finish_reason == "stop" else 0
        if not self.usage_reported or self.completion_tokens <= self.content_chunks + allowance:
            return list(self.chunk_gaps), self.usage_reported
        per_gap = (self.completion_tokens - 1) / (self.content_chunks - 1)
        return [g / per_gap for g in self.chunk_gaps], False


@dataclass
class LatencyStats:
    """Summary of a latency distribution, in milliseconds (None when empty)."""

    n: int
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> LatencyStats:
        ms = sorted(s * 1000.0 for s in samples)
        if not ms:
            return cls(0, None, None, None, None, None)
        return cls(
            n=len(ms),
            mean=sum(ms) / len(ms),
            p50=percentile(ms, 0.50),
            p95=percentile(ms, 0.95),
            p99=percentile(ms, 0.99),
            max=ms[-1],
        )


@dataclass
class HealthSamples:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    ok: int
    errors: int
    error_messages: list[str]
    wall_s: float
    completion_tokens: int
    prompt_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms: LatencyStats
    itl_ms: LatencyStats
    # Requests whose ITL samples had to be approximated (chunks != tokens).
    itl_approx_requests: int
    tpot_ms: LatencyStats
    e2e_ms: LatencyStats
    usage_missing: int
    empty_responses: int
    health_ms: LatencyStats
    health_errors: int
    health_error_messages: list[str]


@dataclass
class RunResult:
    url: str
    model: str
    started_at: str
    max_tokens: int
    temperature: float
    health_interval_ms: float
    levels: list[LevelResult]
    # output tok/s at the highest concurrency / at the lowest concurrency.
    throughput_ratio: float | None
    throughput_ratio_levels: tuple[int, int] | None


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------
def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (same as numpy's default) of sorted data."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def describe_error(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"[:300]


def add_error_message(messages: list[str], message: str) -> None:
    if message not in messages and len(messages) < MAX_ERROR_MESSAGES:
        messages.append(message)


class _EndedAfterFinish(Exception):
    """With --end-at-finish: the body ended after finish_reason, with no [DONE] or usage."""


class StreamProtocolError(Exception):
    """The stream violated the expected OpenAI SSE chunk protocol."""


class HTTPStatusError(Exception):
    """Non-2xx response; carries the start of the body, which the SSE library would drop."""


async def raise_with_body(resp: aiohttp.ClientResponse) -> None:
    # Passed as aiohttp's per-request raise_for_status hook: EventSource only
    # reports "fetch ... failed: <status>", and the server's JSON error body is
    # what actually explains a failure.  aiohttp closes the response after a
    # raise from this hook.
    if resp.status >= 400:
        body = (await resp.read())[:300].decode("utf-8", errors="replace")
        raise HTTPStatusError(f"HTTP {resp.status}: {body}")


def build_payload(model: str, index: int, args: argparse.Namespace) -> dict[str, Any]:
    """Request `index` of a level, shaped by add_request_arguments' flags (and `extra_body`,
    fields a particular server needs, set by sweep.py)."""
    messages = list(PROMPTS[index % len(PROMPTS)])
    if args.system_prompt is not None and messages[0]["role"] != "system":
        # Said explicitly, so that servers whose chat templates differ in the default they
        # insert (or that insert none) still see the same tokens.
        messages.insert(0, {"role": "system", "content": args.system_prompt})
    models = model.split(",")  # several: request i goes to model i mod k (LoRA adapters, say)
    payload = {
        "model": models[index % len(models)],
        "messages": messages,
        "stream": True,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:  # vLLM's extension: every request runs to max_tokens
        payload["ignore_eos"] = True
    return {**payload, **getattr(args, "extra_body", {})}


# ---------------------------------------------------------------------------
# One streamed request
# ---------------------------------------------------------------------------
def _apply_chunk(result: RequestResult, chunk: dict[str, Any], now: float) -> None:
    """Fold one parsed chat.completion.chunk into the request result."""
    if "error" in chunk:
        raise StreamProtocolError(f"error event in stream: {orjson.dumps(chunk['error'])[:200]!r}")
    usage = chunk.get("usage")
    if usage:
        result.usage_reported = True
        result.completion_tokens = int(usage.get("completion_tokens") or 0)
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    has_content = False
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if delta.get("content"):
            has_content = True
        if choice.get("finish_reason"):
            result.finish_reason = choice["finish_reason"]
    if has_content:
        if result.last_content is not None:
            result.chunk_gaps.append(now - result.last_content)
        else:
            result.first_content = now
        result.last_content = now
        result.content_chunks += 1


def add_request_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that shape each level's requests; shared with sweep.py."""
    parser.add_argument("--requests", type=int, default=0, metavar="R",
                        help="total requests per level, shared by its N clients "
                             "(default: max(2*N, 8), i.e. about two requests per client)")
    parser.add_argument("--model", default=None,
                        help="model id, or several comma-separated (request i goes to model i mod k, e.g. LoRA "
                             "adapters) (default: the server's first /v1/models id)")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request (default %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default %(default)s)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="send ignore_eos (vLLM extension): each request runs to max_tokens, so N clients keep "
                             "N sequences decoding, as the runner ceiling's fixed batch does")
    parser.add_argument("--system-prompt", default=None, metavar="TEXT",
                        help="system message for the prompts that have none (compare servers whose chat templates "
                             "insert different defaults; SmolLM2's: \"You are a helpful AI assistant named SmolLM, "
                             "trained by Hugging Face\")")
    parser.add_argument("--warmup", type=int, default=1,
                        help="unmeasured requests sent before the first level (default %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=300.0,
                        help="seconds allowed per request, connect to [DONE] (default %(default)s)")
    parser.add_argument("--health-interval-ms", type=float, default=20.0,
                        help="interval between /health probes (default %(default)s)")
    parser.add_argument("--end-at-finish", action="store_true",
                        help="accept streams that end without [DONE] once finish_reason and usage arrived (transformers serve)")


async def stream_one(
    session: aiohttp.ClientSession, url: str, payload: dict[str, Any], index: int, timeout_s: float,
    end_at_finish: bool = False,
) -> RequestResult:
    """end_at_finish: also accept a stream that ends, without `data: [DONE]`, once it has
    sent both its finish_reason and its usage (transformers serve sends no [DONE] and puts
    usage in the finish chunk), so such servers can be measured."""
    result = RequestResult(index=index, ok=False)
    es: EventSource | None = None

    def on_error() -> None:
        # aiohttp-sse-client 0.2.1 treats end-of-body as a dropped connection:
        # it sets READY_STATE_CONNECTING, calls on_error, sleeps and re-sends
        # the request (a second POST = a second generation).  Raising here
        # aborts that reconnect.  On a failed initial connect the state is
        # already CLOSED, so the library's own exception propagates instead.
        if es is not None and es.ready_state == READY_STATE_CONNECTING:
            if end_at_finish and result.finish_reason:
                raise _EndedAfterFinish  # a server that sends neither [DONE] nor usage
            raise StreamProtocolError("stream ended before 'data: [DONE]'")

    # Timing starts before the connection is made, so TTFT includes connect
    # and request upload (negligible on 127.0.0.1) as a real client sees it.
    result.start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            es = EventSource(
                url,
                option={"method": "POST"},
                session=session,
                max_connect_retry=0,  # never retry the POST
                reconnection_time=timedelta(0),
                on_error=on_error,
                json=payload,
                headers={},  # the library mutates this mapping: fresh one per request
                raise_for_status=raise_with_body,
            )
            done = False
            try:
                async with es:
                    # EventSource reads the body line by line as it arrives
                    # (StreamReader.readline) and yields each event at its blank
                    # line, so it adds no buffering delay to the timestamps.
                    async for event in es:
                        now = time.perf_counter()
                        if event.data == "[DONE]":
                            done = True
                            break  # must stop here, or the library would reconnect
                        try:
                            chunk = orjson.loads(event.data)
                        except orjson.JSONDecodeError as exc:
                            raise StreamProtocolError(f"bad JSON in event: {event.data[:120]!r}") from exc
                        _apply_chunk(result, chunk, now)
                        if end_at_finish and result.finish_reason and result.usage_reported:
                            done = True  # a server that sends usage after finish_reason still gets read to the end
                            break
            except _EndedAfterFinish:
                done = True
            if not done:  # e.g. HTTP 204: the library stops without an event
                raise StreamProtocolError("stream ended before 'data: [DONE]'")
        result.end = time.perf_counter()
        if not result.usage_reported:
            # Fall back to one token per content chunk; flagged as usage_missing.
            result.completion_tokens = result.content_chunks
        result.ok = True
    except TimeoutError:
        result.end = time.perf_counter()
        result.error = f"TimeoutError: no complete response within {timeout_s:g}s"
    except (aiohttp.ClientError, ConnectionError, StreamProtocolError, HTTPStatusError, ValueError) as exc:
        result.end = time.perf_counter()
        result.error = describe_error(exc)
    return result


# ---------------------------------------------------------------------------
# Side task: /health latency while streams are decoding
# ---------------------------------------------------------------------------
async def health_probe(
    session: aiohttp.ClientSession, url: str, interval_s: float, stop: asyncio.Event
) -> HealthSamples:
    samples = HealthSamples()
    probe_timeout = aiohttp.ClientTimeout(total=5)
    next_tick = time.perf_counter()
    while not stop.is_set():
        t0 = time.perf_counter()
        try:
            async with session.get(url, timeout=probe_timeout) as resp:
                await resp.read()
                if resp.status == 200:
                    samples.latencies.append(time.perf_counter() - t0)
                else:
                    samples.errors += 1
                    add_error_message(samples.error_messages, f"HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
            samples.errors += 1
            add_error_message(samples.error_messages, describe_error(exc))
        # Fixed-rate schedule; if a probe overran the tick, start the next one
        # right away but do not burst to "catch up" on missed ticks.
        next_tick = max(next_tick + interval_s, time.perf_counter())
        try:
            await asyncio.wait_for(stop.wait(), timeout=next_tick - time.perf_counter())
        except TimeoutError:
            pass
    return samples


def _probe_process_main(url: str, interval_s: float, conn: Connection) -> None:
    """Entry point of the probe subprocess: probe until the parent says stop."""

    async def probe() -> HealthSamples:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def wait_for_stop() -> None:
            conn.recv()  # any message means stop
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_for_stop, daemon=True).start()
        async with aiohttp.ClientSession() as session:
            conn.send("ready")
            return await health_probe(session, url, interval_s, stop)

    conn.send(asdict(asyncio.run(probe())))


class HealthProbeProcess:
    """Runs health_probe in a child process for the duration of a level.

    Why a process: this script's own event loop is busy parsing N streams, and
    a probe sharing it (or sharing its GIL from a thread) would report this
    client's scheduling delays as server latency.  A separate process with its
    own loop measures only the server (plus kernel scheduling on a loaded box).
    """

    def __init__(self, url: str, interval_s: float) -> None:
        self._url = url
        self._interval_s = interval_s
        self.samples = HealthSamples()

    async def __aenter__(self) -> HealthProbeProcess:
        # spawn, not fork: forking a process that has a running event loop and
        # open sockets is unsafe.
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_probe_process_main, args=(self._url, self._interval_s, child_conn),
                                 daemon=True)
        self._proc.start()
        child_conn.close()
        # Wait until the child is probing, so the level's timing starts with the probe running.
        await asyncio.to_thread(self._recv, 30.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            self._conn.send("stop")
            data = await asyncio.to_thread(self._recv, 30.0)
            self.samples = HealthSamples(**data)
        finally:
            self._conn.close()
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()

    def _recv(self, timeout_s: float) -> Any:
        if not self._conn.poll(timeout_s):
            raise RuntimeError("/health probe process did not respond")
        return self._conn.recv()


# ---------------------------------------------------------------------------
# One concurrency level
# ---------------------------------------------------------------------------
async def client_worker(
    session: aiohttp.ClientSession,
    chat_url: str,
    indices: Iterator[int],
    args: argparse.Namespace,
    model: str,
    on_result: Callable[[RequestResult], None] | None = None,
) -> list[RequestResult]:
    # Closed loop: each client sends its next request as soon as the previous
    # one finished.  All workers share one iterator (safe: single thread), so
    # the total per level is fixed and prompts are assigned deterministically.
    results = []
    for index in indices:
        payload = build_payload(model, index, args)
        results.append(await stream_one(session, chat_url, payload, index, args.request_timeout,
                                        args.end_at_finish))
        if on_result is not None:  # e.g. a progress bar (bench/sweep.py)
            on_result(results[-1])
    return results


def summarize_level(
    concurrency: int, results: list[RequestResult], wall_s: float, health: HealthSamples
) -> LevelResult:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    error_messages: list[str] = []
    for r in failed:
        add_error_message(error_messages, r.error or "unknown error")

    itl: list[float] = []
    approx = 0
    for r in ok:
        samples, exact = r.itl_samples()
        itl.extend(samples)
        approx += 0 if exact or not samples else 1

    # Throughput counts only completed requests' tokens over the level's wall
    # time (first request sent -> last request finished, tail included).
    completion_tokens = sum(r.completion_tokens for r in ok)
    return LevelResult(
        concurrency=concurrency,
        requests=len(results),
        ok=len(ok),
        errors=len(failed),
        error_messages=error_messages,
        wall_s=wall_s,
        completion_tokens=completion_tokens,
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        output_tokens_per_s=completion_tokens / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        ttft_ms=LatencyStats.from_seconds([r.ttft for r in ok if r.ttft is not None]),
        itl_ms=LatencyStats.from_seconds(itl),
        itl_approx_requests=approx,
        tpot_ms=LatencyStats.from_seconds([r.tpot for r in ok if r.tpot is not None]),
        e2e_ms=LatencyStats.from_seconds([r.end - r.start for r in ok]),
        usage_missing=sum(1 for r in ok if not r.usage_reported),
        empty_responses=sum(1 for r in ok if r.content_chunks == 0),
        health_ms=LatencyStats.from_seconds(health.latencies),
        health_errors=health.errors,
        health_error_messages=health.error_messages,
    )


def level_requests(concurrency: int, requests: int) -> int:
    """Requests sent at one level: --requests if given, else about two per client."""
    return requests if requests else max(2 * concurrency, 8)


async def run_level(
    concurrency: int, args: argparse.Namespace, model: str, session: aiohttp.ClientSession,
    on_result: Callable[[RequestResult], None] | None = None,
) -> LevelResult:
    """One level against args.url (reads args.requests, .health_interval_ms, .max_tokens,
    .temperature, .request_timeout); on_result is called after each request finishes."""
    total = level_requests(concurrency, args.requests)
    base = args.url.rstrip("/")
    indices = iter(range(total))
    async with HealthProbeProcess(base + "/health", args.health_interval_ms / 1000.0) as probe:
        t0 = time.perf_counter()
        per_worker = await asyncio.gather(
            *(client_worker(session, base + "/v1/chat/completions", indices, args, model, on_result)
              for _ in range(concurrency))
        )
        wall_s = time.perf_counter() - t0
    results = sorted((r for rs in per_worker for r in rs), key=lambda r: r.index)
    return summarize_level(concurrency, results, wall_s, probe.samples)


# ---------------------------------------------------------------------------
# Setup: model discovery and warm-up
# ---------------------------------------------------------------------------
async def discover_model(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(base + "/v1/models", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET /v1/models -> HTTP {resp.status}: {body[:200]!r}")
    data = orjson.loads(body).get("data") or []
    if not data:
        raise RuntimeError("GET /v1/models returned no models; pass --model")
    return str(data[0]["id"])


async def warm_up(session: aiohttp.ClientSession, args: argparse.Namespace, model: str) -> None:
    # Unmeasured requests so one-off costs (lazy init, kernel compilation,
    # graph capture) do not land in the first level's TTFT.
    chat_url = args.url.rstrip("/") + "/v1/chat/completions"
    for i in range(args.warmup):
        r = await stream_one(session, chat_url, build_payload(model, i, args),
                             i, args.request_timeout, args.end_at_finish)
        if not r.ok:
            raise RuntimeError(f"warm-up request failed: {r.error}")


# ---------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(levels: Sequence[LevelResult]) -> str:
    header = (
        f"{'conc':>4} {'reqs':>5} {'err':>4} {'wall_s':>7} {'out_tok/s':>10} {'req/s':>7} "
        f"{'ttft_p50':>9} {'ttft_p95':>9} {'itl_p50':>8} {'itl_p95':>8} {'tpot_p50':>9} "
        f"{'hlth_p50':>9} {'hlth_p99':>9} {'hlth_max':>9}"
    )
    lines = [header, "-" * len(header)]
    for lv in levels:
        lines.append(
            f"{lv.concurrency:>4} {lv.requests:>5} {lv.errors:>4} {lv.wall_s:>7.2f} "
            f"{lv.output_tokens_per_s:>10.1f} {lv.requests_per_s:>7.2f} "
            f"{fmt(lv.ttft_ms.p50):>9} {fmt(lv.ttft_ms.p95):>9} "
            f"{fmt(lv.itl_ms.p50, 2):>8} {fmt(lv.itl_ms.p95, 2):>8} {fmt(lv.tpot_ms.p50, 2):>9} "
            f"{fmt(lv.health_ms.p50, 2):>9} {fmt(lv.health_ms.p99, 2):>9} {fmt(lv.health_ms.max, 2):>9}"
        )
    lines.append("(latencies in ms; itl = per-token gap between content chunks, tpot = per-request "
                 "(e2e - ttft)/(tokens - 1), hlth = GET /health)")
    return "\n".join(lines)


def format_notes(levels: Sequence[LevelResult]) -> str:
    notes = []
    for lv in levels:
        prefix = f"[conc {lv.concurrency}]"
        if lv.errors:
            notes.append(f"{prefix} {lv.errors} request error(s); first messages:")
            notes.extend(f"    {m}" for m in lv.error_messages)
        if lv.health_errors:
            notes.append(f"{prefix} {lv.health_errors} /health probe error(s): "
                         + "; ".join(lv.health_error_messages))
        if lv.itl_approx_requests:
            notes.append(f"{prefix} {lv.itl_approx_requests} request(s) had chunks carrying several "
                         "tokens; their ITL samples are approximated (gap / mean tokens per gap)")
        if lv.usage_missing:
            notes.append(f"{prefix} {lv.usage_missing} request(s) had no usage chunk; "
                         "tokens counted as content chunks")
        if lv.empty_responses:
            notes.append(f"{prefix} {lv.empty_responses} request(s) streamed no content")
    return "\n".join(notes)


def throughput_ratio(levels: Sequence[LevelResult]) -> tuple[float | None, tuple[int, int] | None]:
    if len(levels) < 2:
        return None, None
    low = min(levels, key=lambda lv: lv.concurrency)
    high = max(levels, key=lambda lv: lv.concurrency)
    if low.output_tokens_per_s <= 0:
        return None, (high.concurrency, low.concurrency)
    return high.output_tokens_per_s / low.output_tokens_per_s, (high.concurrency, low.concurrency)


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
async def run(args: argparse.Namespace) -> RunResult:
    base = args.url.rstrip("/")
    # limit=0: the default pool cap of 100 connections would silently cap the
    # concurrency.  total=None: per-request deadlines are set in stream_one.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        model = args.model or await discover_model(session, base)
        print(f"model: {model}   url: {base}   max_tokens: {args.max_tokens}   "
              f"temperature: {args.temperature}", file=sys.stderr)
        await warm_up(session, args, model)
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        levels: list[LevelResult] = []
        for concurrency in args.concurrency:
            total = level_requests(concurrency, args.requests)
            print(f"level {concurrency}: {total} requests ...", file=sys.stderr, flush=True)
            levels.append(await run_level(concurrency, args, model, session))
    ratio, ratio_levels = throughput_ratio(levels)
    return RunResult(
        url=base,
        model=model,
        started_at=started_at,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        health_interval_ms=args.health_interval_ms,
        levels=levels,
        throughput_ratio=ratio,
        throughput_ratio_levels=ratio_levels,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Metrics:\n"
            "  out_tok/s  sum of usage.completion_tokens of successful requests / level wall time\n"
            "             (first request sent -> last finished; the tail with < N in flight is included).\n"
            "  TTFT       request sent (incl. connect) -> first chunk with non-empty delta.content.\n"
            "  ITL        gaps between successive content chunks of a request.  When the chunk count\n"
            "             matches usage.completion_tokens (+1 for a stop token) each gap is one token\n"
            "             (exact).  Otherwise the server packed several tokens into some chunks and each\n"
            "             gap is divided by (tokens-1)/(chunks-1); such requests are counted as\n"
            "             'approximated'.  Gaps keep stalls visible in p95, which a per-request mean hides.\n"
            "  TPOT       per-request (e2e - TTFT) / (completion_tokens - 1), shown as a cross-check.\n"
            "  /health    GET latency sampled every --health-interval-ms during each level, from a\n"
            "             separate process so this client's own load does not pollute it.\n"
            "Each request uses a fresh TCP connection (the SSE library closes the response\n"
            "rather than returning it to the pool); on 127.0.0.1 that costs well under 1 ms.\n"
            "Exit status: 0 if every measured request succeeded, 1 otherwise."
        ),
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], metavar="N",
                        help="concurrency levels, run in the given order (default: 1 8 32)")
    add_request_arguments(parser)
    parser.add_argument("--json", metavar="PATH", default=None, help="also write all figures as JSON to PATH")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.concurrency):
        parser.error("--concurrency values must be >= 1")
    if args.requests < 0 or args.max_tokens < 1 or args.warmup < 0:
        parser.error("--requests/--warmup must be >= 0 and --max-tokens >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = asyncio.run(run(args))
    except (RuntimeError, aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
        print(f"error: {describe_error(exc)}", file=sys.stderr)
        return 1
    print(format_table(result.levels))
    notes = format_notes(result.levels)
    if notes:
        print(notes)
    if result.throughput_ratio is not None and result.throughput_ratio_levels is not None:
        hi, lo = result.throughput_ratio_levels
        print(f"throughput ratio (out_tok/s at conc {hi} / conc {lo}): {result.throughput_ratio:.2f}x")
    if args.json:
        with open(args.json, "wb") as fh:
            fh.write(orjson.dumps(asdict(result), option=orjson.OPT_INDENT_2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 1 if any(lv.errors for lv in result.levels) else 0


if __name__ == "__main__":
    sys.exit(main())
