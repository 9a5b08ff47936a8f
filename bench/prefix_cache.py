"""TTFT of a multi-turn chat resent each turn, with a ~1,500-token shared history.

Turn 1 sends a long history and gets a reply; turn 2 resends that history plus the reply
and one more question, as chat clients do. With prefix caching the second turn prefills
only what is new. A cold request of the same length (different text) is the control.
`--between N` sends N short unrelated chats between the turns: with N above the server's
slot count, turn 1's slot is handed to another request, and turn 2 can find its history
only in the prefix pool (`--prefix-pool-tokens`).

    python bench/prefix_cache.py --url http://127.0.0.1:8000 [--between 40]
"""

import argparse
import asyncio
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
        async with session.get(f"{args.url}/health") as resp:
            health = await resp.json()
    print(f"cold control TTFT   {cold * 1000:8.1f} ms")
    print(f"turn 1 TTFT         {first * 1000:8.1f} ms")
    print(f"turn 2 TTFT         {second * 1000:8.1f} ms  ({100 * second / first:.1f} % of turn 1)")
    print(f"prefix-cache tokens reused so far: {health.get('prefix_cache_tokens_reused')}")


if __name__ == "__main__":
    asyncio.run(main())
