"""Embeddings/s served over HTTP against sentence-transformers' own `encode` in one process.

    aserve serve --model all-MiniLM-L6-v2 --port 8130 &
    python bench/embeddings.py --url http://127.0.0.1:8130 --model-dir ~/.cache/aserve/all-MiniLM-L6-v2

For each concurrency level, that many clients each send requests of `--batch` sentences
(32) until `--sentences` have been embedded; then sentence-transformers encodes the same
sentences in this process (batch_size 32, as its default), while the server sits idle. It
prints embeddings/s for each and their ratio, and the smallest cosine between the two
vectors of a sentence (they should agree to 1e-4).
"""

import argparse
import asyncio
import random
import time

import aiohttp
import numpy as np

WORDS = ("the printing press movable metal type ink screw wine books copied by hand scarce expensive errors "
         "presses cities volumes literacy spelling grammar scientists diagrams data reformation ideas authorities "
         "historians revolution information reproduced distributed weather paris tokyo river mountain quick brown "
         "fox lazy dog server model token batch stream client request answer question").split()


def sentences(count: int, seed: int = 0) -> list[str]:
    """Varied lengths (3 to 60 words), as a retrieval corpus has them."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))).capitalize() + "." for _ in range(count)]


async def served(url: str, texts: list[str], clients: int, batch: int) -> tuple[float, np.ndarray]:
    chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    vectors: list[list[float] | None] = [None] * len(texts)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(chunks)):
        queue.put_nowait(i)

    async def client(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            async with session.post(url + "/v1/embeddings", json={"input": chunks[i]}) as resp:
                body = await resp.json()
                assert resp.status == 200, body
            for d in body["data"]:
                vectors[i * batch + d["index"]] = d["embedding"]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        await client_warmup(session, url)
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return len(texts) / elapsed, np.array(vectors)


async def client_warmup(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(url + "/v1/embeddings", json={"input": sentences(32, seed=99)}) as resp:
        await resp.read()


def in_process(model_dir: str, texts: list[str], batch: int) -> tuple[float, float, np.ndarray]:
    """(embeddings/s encoding all at once, embeddings/s encoding `batch` at a time, vectors)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(sentences(32, seed=99), batch_size=32)  # warm-up
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=32)
    whole = len(texts) / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(0, len(texts), batch):
        model.encode(texts[i:i + batch], batch_size=32)
    return whole, len(texts) / (time.perf_counter() - started), vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8130")
    parser.add_argument("--model-dir", required=True, help="the served sentence-transformers directory")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--sentences", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    texts = sentences(args.sentences)
    results = {n: asyncio.run(served(args.url, texts, n, args.batch)) for n in args.concurrency}
    reference_rate, per_request_rate, reference = in_process(args.model_dir, texts, args.batch)
    print(f"sentence-transformers encode, one process: {reference_rate:.1f} embeddings/s all at once (sorted by "
          f"length as a whole), {per_request_rate:.1f} embeddings/s {args.batch} at a time")
    for n, (rate, vectors) in results.items():
        cosine = ((vectors * reference).sum(1) / np.linalg.norm(vectors, axis=1)
                  / np.linalg.norm(reference, axis=1)).min()
        print(f"aserve, {n:3d} clients x {args.batch}-sentence requests: {rate:.1f} embeddings/s "
              f"({rate / reference_rate:.2f}x), min cosine to sentence-transformers {cosine:.7f}")


if __name__ == "__main__":
    main()
