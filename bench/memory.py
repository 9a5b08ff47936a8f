"""Server RSS after 100 requests and after many more: memory must not grow with traffic.

Runs `--requests` short streaming chats at `--concurrency` against a running server and
reads the server's resident set size from /proc/PID/status at checkpoints.

    python bench/memory.py --url http://127.0.0.1:8000 --pid "$(pgrep -f 'aserve serve')" --requests 2000
"""

import argparse
import asyncio
from pathlib import Path

import aiohttp

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "用一句话介绍你自己。",
           "List three prime numbers.", "Explain what a KV cache is in one sentence."]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.requests < 100:
        parser.error("--requests must be at least 100: RSS is compared with the reading after 100")
    checkpoints = {100, args.requests}
    done, errors, sent = 0, 0, 0
    readings: dict[int, float] = {0: rss_mib(args.pid)}

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal done, errors, sent
        while sent < args.requests:
            i, sent = sent, sent + 1
            body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "stream": i % 2 == 0,
                    "max_tokens": args.max_tokens, "temperature": 0.7, "seed": i}
            try:
                async with session.post(f"{args.url}/v1/chat/completions", json=body) as resp:
                    await resp.read()
                    errors += resp.status != 200
            except aiohttp.ClientError:
                errors += 1
            done += 1
            if done in checkpoints:
                readings[done] = rss_mib(args.pid)
                print(f"after {done:5d} requests: RSS {readings[done]:8.1f} MiB", flush=True)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(client(session) for _ in range(args.concurrency)))
    growth = 100 * (readings[args.requests] - readings[100]) / readings[100]
    print(f"RSS at start {readings[0]:.1f} MiB; after {args.requests} vs after 100: {growth:+.2f} %; errors {errors}")


if __name__ == "__main__":
    asyncio.run(main())
