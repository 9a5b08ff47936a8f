"""Does loading a LoRA adapter at run time stall the streams already running?

    python bench/make_lora.py /tmp/adapters --count 2 --rank 16
    aserve serve --enable-lora true --lora-modules a0=/tmp/adapters/a0 --allow-runtime-lora-updating true &
    python bench/lora_load_stall.py --adapter /tmp/adapters/a1

`--streams` streaming chats (half on the base model, half on the adapter served at start, when
`--running-adapter` names one) decode `--max-tokens` tokens each. Once they all stream, the
script loads a new adapter (POST /v1/load_lora_adapter) and sends one chat on it, which puts it
in a slot of the model. The load window runs from the POST to the step that prefills that
chat (which ends with its first token): the read, the slot being filled a few layers per step,
and the chat waiting for it. It prints the running streams' token gaps: the median over the
whole run, p99 and max of the gaps that end inside the window (the issue's target: p99 there
under 3x the median), and apart from those the gap of the step that prefilled the new chat,
as any new request's arrival does (bench/load.py's ITL p95 shows those).
"""

import argparse
import asyncio
import statistics
import time

import aiohttp
import orjson


async def stream_chat(session: aiohttp.ClientSession, url: str, model: str, max_tokens: int,
                      stamps: list[float]) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = orjson.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--adapter", required=True, help="PEFT adapter directory to load at run time")
    parser.add_argument("--name", default="loaded-at-run-time")
    parser.add_argument("--running-adapter", default="a0", help="adapter served at start ('' for none)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=300)
    args = parser.parse_args()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.get(args.url + "/v1/models") as resp:
            base = (await resp.json())["data"][0]["id"]
        models = [args.running_adapter if args.running_adapter and i % 2 else base for i in range(args.streams)]
        stamps: list[list[float]] = [[] for _ in models]
        tasks = [asyncio.create_task(stream_chat(session, args.url, m, args.max_tokens, s))
                 for m, s in zip(models, stamps)]
        while min(len(s) for s in stamps) < 40:  # every stream decoding for a while
            await asyncio.sleep(0.05)
        window_start = time.perf_counter()
        async with session.post(args.url + "/v1/load_lora_adapter",
                                json={"lora_name": args.name, "lora_path": args.adapter}) as resp:
            print("load:", resp.status, (await resp.text()).strip())
        loaded_at = time.perf_counter()
        first: list[float] = []
        await stream_chat(session, args.url, args.name, 1, first)
        window_end = first[0]
        remaining = min(args.max_tokens - len(s) for s in stamps)
        await asyncio.gather(*tasks)
    gaps = [(b - a, b) for s in stamps for a, b in zip(s, s[1:])]
    median = statistics.median(g for g, _ in gaps)
    # The new chat's prefill step ends with its first token and the running streams' next ones;
    # those gaps end within a few ms of it. Everything before is the load.
    load_end = window_end - 0.005
    inside = [g for g, end in gaps if window_start <= end <= load_end]
    prefill = [g for g, end in gaps if load_end < end <= window_end + 0.005]
    print(f"{args.streams} streams, {len(gaps)} gaps; load POST took {1000 * (loaded_at - window_start):.1f} ms, "
          f"window (POST to the new adapter's first token) {1000 * (window_end - window_start):.1f} ms, "
          f"streams had >= {remaining} tokens left when it ended")
    worst = sorted(((g, end) for g, end in gaps if window_start <= end <= load_end), reverse=True)[:3]
    print("longest gaps in the window (ms, and when they ended, ms after the POST):",
          ", ".join(f"{1000 * g:.0f} at {1000 * (end - window_start):.0f}" for g, end in worst),
          f"(POST answered at {1000 * (loaded_at - window_start):.0f})")
    print(f"median gap {1000 * median:.1f} ms; inside the window: {len(inside)} gaps, "
          f"p99 {1000 * percentile(inside, 99):.1f} ms ({percentile(inside, 99) / median:.2f}x median), "
          f"max {1000 * max(inside):.1f} ms ({max(inside) / median:.2f}x); the new chat's prefill step: "
          f"{1000 * max(prefill, default=0):.1f} ms ({max(prefill, default=0) / median:.2f}x)")


if __name__ == "__main__":
    asyncio.run(main())
