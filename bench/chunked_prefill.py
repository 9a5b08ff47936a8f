"""Inter-token latency of running streams while a long prompt is prefilled.

N streams decode (ignore_eos, so they run to max_tokens); once all of them stream, one
request with a ~4,000-token prompt arrives. The report compares the streams' token gaps
while that prompt is prefilled with their median gap: with chunked prefill, one step holds
at most max_num_batched_tokens tokens, so the gaps stay bounded.

    aserve serve --max-model-len 4608 [--prefill-budget-while-decoding 16] &
    python bench/chunked_prefill.py --url http://127.0.0.1:8000
"""

import argparse
import asyncio
import statistics
import time

import aiohttp
import orjson

FILLER = "The river bends twice before it reaches the old mill, where the water runs fast and cold. "


async def stream(session: aiohttp.ClientSession, url: str, messages: list[dict], max_tokens: int,
                 stamps: list[float]) -> None:
    body = {"messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.startswith(b"data: {"):
                choices = orjson.loads(line[6:])["choices"]
                if choices and choices[0]["delta"].get("content"):
                    stamps.append(time.perf_counter())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def watch_steps(session: aiohttp.ClientSession, url: str, marks: list[tuple[float, int]],
                      stop: asyncio.Event) -> None:
    """Records (time, engine step counter) every few ms: a step's duration is the time between
    two increments, a direct view of how long the running streams wait."""
    while not stop.is_set():
        async with session.get(f"{url}/health") as resp:
            marks.append((time.perf_counter(), (await resp.json())["steps"]))
        await asyncio.sleep(0.005)


def step_durations(marks: list[tuple[float, int]], start: float, end: float) -> list[float]:
    changes = [t for (t, n), (_, prev) in zip(marks[1:], marks) if n != prev and start <= t <= end]
    return [b - a for a, b in zip(changes, changes[1:])]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--stream-tokens", type=int, default=1100)
    parser.add_argument("--repeats", type=int, default=210, help="filler sentences in the long prompt (~19 tokens each)")
    args = parser.parse_args()
    stamps: list[list[float]] = [[] for _ in range(args.streams)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        streams = [asyncio.create_task(stream(session, args.url, [{"role": "user", "content": f"Count to {i + 50}."}],
                                              args.stream_tokens, stamps[i])) for i in range(args.streams)]
        while not all(len(s) >= 20 for s in stamps):
            await asyncio.sleep(0.05)
        long_prompt = [{"role": "user", "content": FILLER * args.repeats + "Summarize."}]
        marks: list[tuple[float, int]] = []
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_steps(session, args.url, marks, stop))
        start = time.perf_counter()
        await stream(session, args.url, long_prompt, 1, [])
        end = time.perf_counter()
        stop.set()
        await watcher
        await asyncio.gather(*streams)
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
    during = [b - a for s in stamps for a, b in zip(s, s[1:]) if b > start and a < end]
    median = statistics.median(gaps)
    before = statistics.median([b - a for s in stamps for a, b in zip(s, s[1:]) if b <= start])
    print(f"long prompt prefilled in {end - start:.2f} s while {args.streams} streams decoded")
    if any(len(s) < args.stream_tokens * 0.9 for s in stamps) or max(s[-1] for s in stamps) < end:
        print("warning: a stream ended before the prefill did; raise --stream-tokens")
    steps = step_durations(marks, start, end)
    print(f"stream chunk gaps: median {median * 1000:.1f} ms over {len(gaps)}; during the prefill "
          f"p99 {percentile(during, 0.99) * 1000:.1f} ms, max {max(during) * 1000:.1f} ms over {len(during)}")
    print(f"engine steps during the prefill (from /health's step counter): {len(steps)}, "
          f"median {statistics.median(steps) * 1000:.0f} ms, p99 {percentile(steps, 0.99) * 1000:.0f} ms, "
          f"max {max(steps) * 1000:.0f} ms")
    # Every running stream gets one token per step, so a step's duration is their token gap;
    # a chunk gap can be longer when text was held back (an incomplete character) for a step.
    print(f"token gap p99 during the prefill / median: {percentile(steps, 0.99) / median:.2f}x "
          f"(chunk gaps: {percentile(during, 0.99) / median:.2f}x)")
    print(f"against the streams' median gap before the long prompt arrived ({before * 1000:.1f} ms): "
          f"steps {percentile(steps, 0.99) / before:.2f}x, chunk gaps {percentile(during, 0.99) / before:.2f}x")
    worst = sorted(((b - a, b - start) for s in stamps for a, b in zip(s, s[1:]) if b > start and a < end),
                   reverse=True)[:6]
    print("worst gaps (ms @ s after the long prompt was sent): "
          + ", ".join(f"{gap * 1000:.0f} @ {at:.2f}" for gap, at in worst))


if __name__ == "__main__":
    asyncio.run(main())
