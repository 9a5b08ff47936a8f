"""Prefix caching, measured from outside: TTFT of prompts that share a ~1,500-token start.

Two scenarios, each against a cold control (a request of the same length, different text):
- a multi-turn chat resent each turn: turn 1 sends a long history and gets a reply; turn 2
  resends that history plus the reply and one more question, as chat clients do, and
  prefills only what is new. `--between N` sends N short unrelated chats between the turns.
- `--concurrent N`: N new chats sent at once, all with the same long system prompt (seen
  once before) and each its own question. Their blocks for the system prompt are shared: the
  KV blocks in use at the peak (polled from /health) show it stored once, not N times.

    python bench/prefix_cache.py --url http://127.0.0.1:8000 [--between 40] [--concurrent 32]
"""

import argparse
import asyncio
import statistics
import time

import aiohttp
import orjson

FILLER = ("The history of the lighthouse at the end of the harbour is long and full of storms, "
          "keepers, ships that were saved and some that were not. ")


async def ttft(session: aiohttp.ClientSession, url: str, messages: list[dict], max_tokens: int) -> tuple[float, str]:
    body = {"messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": 0}
    start, first, text = time.perf_counter(), None, ""
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            delta = orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if delta and first is None:
                first = time.perf_counter() - start
            text += delta
    return first or float("nan"), text


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--repeats", type=int, default=52, help="filler sentences (~29 tokens each)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--between", type=int, default=0, help="short unrelated chats sent between the two turns")
    parser.add_argument("--concurrent", type=int, default=0, help="also: this many new chats at once sharing a system prompt")
    args = parser.parse_args()
    history = [{"role": "system", "content": FILLER * args.repeats},
               {"role": "user", "content": "Summarize the history above in one sentence."}]
    async with aiohttp.ClientSession() as session:
        control = " ".join(reversed(FILLER.split())) + " "  # same words, so about as many tokens
        cold, _ = await ttft(session, args.url, [{"role": "system", "content": control * args.repeats},
                                                 history[1]], args.max_tokens)
        first, reply = await ttft(session, args.url, history, args.max_tokens)
        for i in range(args.between):
            await ttft(session, args.url, [{"role": "user", "content": f"Name a number above {7 * i}."}], 4)
        second, _ = await ttft(session, args.url, history + [{"role": "assistant", "content": reply},
                                                             {"role": "user", "content": "And who kept it?"}],
                               args.max_tokens)
        print(f"cold control TTFT   {cold * 1000:8.1f} ms")
        print(f"turn 1 TTFT         {first * 1000:8.1f} ms")
        print(f"turn 2 TTFT         {second * 1000:8.1f} ms  ({100 * second / first:.1f} % of turn 1)")
        if args.concurrent:
            await concurrent_chats(session, args.url, args.concurrent, FILLER.replace("harbour", "bay") * args.repeats,
                                   args.max_tokens, cold)
        health = await get_health(session, args.url)
    print(f"prefix cache: {health['prefix_cache_hits']} of {health['prefix_cache_queries']} prompt tokens hit "
          f"({100 * health['prefix_cache_hit_rate']:.1f} %); preemptions {health['preemptions']}")


async def get_health(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(f"{url}/health") as resp:
        return await resp.json()


async def concurrent_chats(session: aiohttp.ClientSession, url: str, n: int, system: str, max_tokens: int,
                           cold: float) -> None:
    def chat(i: int) -> list[dict]:
        return [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: who kept it in {1900 + i}?"}]

    await ttft(session, url, chat(-1), 1)  # the system prompt's first use
    idle = await get_health(session, url)
    peak = 0
    tasks = [asyncio.create_task(ttft(session, url, chat(i), max_tokens)) for i in range(n)]
    while not all(t.done() for t in tasks):
        health = await get_health(session, url)
        peak = max(peak, health["kv_blocks_total"] - health["kv_blocks_free"])
        await asyncio.sleep(0.02)
    ttfts = [t.result()[0] for t in tasks]
    p50 = statistics.median(ttfts)
    size = idle["kv_block_size"]
    print(f"{n} concurrent chats sharing the system prompt: TTFT p50 {p50 * 1000:.1f} ms "
          f"({100 * p50 / cold:.1f} % of the cold control), max {max(ttfts) * 1000:.1f} ms")
    async with session.post(f"{url}/tokenize", json={"messages": chat(0), "add_generation_prompt": True}) as resp:
        prompt_tokens = (await resp.json())["count"]
    print(f"KV blocks in use at the peak: {peak} ({peak * size} positions) for {n} chats of {prompt_tokens} prompt "
          f"tokens and up to {max_tokens} more each: {n * -(-(prompt_tokens + max_tokens) // size)} blocks unshared")


if __name__ == "__main__":
    asyncio.run(main())
