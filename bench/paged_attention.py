"""Decode attention per layer call: the paged CPU kernel against the torch paths.

Three ways to attend one decode token per sequence over its cached context, on SmolLM2-135M's
attention shape by default (9 query heads, 3 kv heads, head_dim 64):

  kernel  aserve.models.paged_attention's C++ kernel over a paged cache whose block tables
          are shuffled (blocks of a sequence scattered over the pool, as after some churn)
  gather  the same call with backend="torch": gather each sequence's blocks, masked softmax
  slot    the contiguous-slot layout aserve uses before paging: K/V of a layer as
          [rows, kv_heads, slot_len, head_dim], attended over a view of the first `context`
          positions, queries folded as [rows, kv_heads, group, head_dim]; float32 runs
          matmul + bias + softmax + matmul, other dtypes SDPA on the same layout (as
          aserve/models/llama.py's _decode_attention does)

With --chunk N, each sequence instead has a prefill chunk of N tokens ending its context (N
queries over cached positions, as a later chunk of a long prompt or a new turn of a chat has):

  kernel  the same kernel, the chunk's tokens attended together in tiles
  dense   what aserve/models/llama.py does for a chunk where the kernel is unavailable: gather the
          sequence's blocks into one contiguous run, then SDPA with a causal mask

Each layer has its own cache and the calls rotate over --layers of them, so the cache is read
from memory as in a real decode step rather than from the CPU's L3 after the first call.

    .venv/bin/python bench/paged_attention.py                       # float32, contexts 128 and 1024
    .venv/bin/python bench/paged_attention.py --dtype bfloat16 --batch 1 --context 128
    .venv/bin/python bench/paged_attention.py --dtype bfloat16 --batch 1 --chunk 16 32 64 128 --context 512 1600 3000
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from aserve.models.llama import chunk_attention
from aserve.models.cpu_kernels import kernel_available
from aserve.models.paged_attention import paged_attention


def time_ms(fns: dict[str, Callable[[int], object]], layers: int, repeats: int) -> dict[str, float]:
    """Median per-call time of each function over `repeats` passes over all layers. The
    functions take turns pass by pass, so a slower stretch of a shared machine hits all of them."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats + 1):  # the first pass warms up
        for name, fn in fns.items():
            start = time.perf_counter()
            for layer in range(layers):
                fn(layer)
            samples[name].append((time.perf_counter() - start) / layers * 1e3)
    return {name: statistics.median(times[1:]) for name, times in samples.items()}


def paged_case(batch: int, context: int, queries: int, args: argparse.Namespace,
               gen: torch.Generator) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """`queries` query tokens, and per layer a paged cache holding `batch` rows of `context`
    positions whose block tables are shuffled: (q, [(k_cache, v_cache)] * layers, tables)."""
    dtype = getattr(torch, args.dtype)
    kv_heads, head_dim, bs = args.kv_heads, args.head_dim, args.block_size
    blocks_per_row = -(-context // bs)
    num_blocks = batch * blocks_per_row
    q = torch.randn(queries, args.heads, head_dim, generator=gen).to(dtype)
    paged = [(torch.randn(num_blocks, kv_heads, bs, head_dim, generator=gen).to(dtype),
              torch.randn(num_blocks, kv_heads, bs, head_dim, generator=gen).to(dtype)) for _ in range(args.layers)]
    tables = torch.randperm(num_blocks, generator=gen).view(batch, blocks_per_row).to(torch.int32)
    return q, paged, tables


def run(batch: int, context: int, args: argparse.Namespace) -> dict[str, float]:
    dtype = getattr(torch, args.dtype)
    heads, kv_heads, head_dim = args.heads, args.kv_heads, args.head_dim
    group, scale = heads // kv_heads, head_dim ** -0.5
    gen = torch.Generator().manual_seed(0)
    q, paged, tables = paged_case(batch, context, batch, args, gen)
    rows = torch.arange(batch, dtype=torch.int32)
    lens = torch.full((batch,), context, dtype=torch.int32)

    slot_len = max(args.slot_len, context)
    slots = [(torch.randn(batch, kv_heads, slot_len, head_dim, generator=gen).to(dtype),
              torch.randn(batch, kv_heads, slot_len, head_dim, generator=gen).to(dtype)) for _ in range(args.layers)]
    bias = torch.zeros(batch, 1, 1, context, dtype=dtype)  # every row full here; -inf past a row's length

    def slot(layer: int) -> torch.Tensor:
        k_cache, v_cache = slots[layer]
        keys, values = k_cache[:, :, :context], v_cache[:, :, :context]
        qd = q.view(batch, kv_heads, group, head_dim)
        if dtype == torch.float32:
            scores = torch.matmul(qd * scale, keys.transpose(-1, -2))
            return torch.matmul(torch.softmax(scores + bias, dim=-1), values)
        return F.scaled_dot_product_attention(qd, keys, values, attn_mask=bias, scale=scale)

    fns = {"slot": slot}
    if not args.no_gather:
        fns["gather"] = lambda layer: paged_attention(q, *paged[layer], tables, rows, lens, scale, backend="torch")
    if kernel_available():
        fns["kernel"] = lambda layer: paged_attention(q, *paged[layer], tables, rows, lens, scale, backend="kernel")
    return time_ms(fns, args.layers, args.repeats)


def run_chunk(batch: int, chunk: int, context: int, args: argparse.Namespace) -> dict[str, float]:
    q, paged, tables = paged_case(batch, context, batch * chunk, args, torch.Generator().manual_seed(0))
    rows = torch.arange(batch, dtype=torch.int32).repeat_interleave(chunk)
    lens = torch.arange(context - chunk + 1, context + 1, dtype=torch.int32).repeat(batch)
    long_tables = tables.long()
    scale = args.head_dim ** -0.5

    def dense(layer: int) -> list[torch.Tensor]:
        k_cache, v_cache = paged[layer]
        return [chunk_attention(q[r * chunk : (r + 1) * chunk].transpose(0, 1).unsqueeze(0), k_cache, v_cache,
                                long_tables[r], context - chunk, scale) for r in range(batch)]

    fns = {"dense": dense}
    if kernel_available():
        fns["kernel"] = lambda layer: paged_attention(q, *paged[layer], tables, rows, lens, scale, backend="kernel")
    return time_ms(fns, args.layers, args.repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--context", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30, help="separate caches the calls rotate over (SmolLM2-135M: 30)")
    parser.add_argument("--slot-len", type=int, default=2048, help="positions per slot of the slot cache (max_model_len)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--no-gather", action="store_true", help="skip the (slow) torch gather path")
    parser.add_argument("--chunk", type=int, nargs="+", default=[],
                        help="prefill chunks of these lengths, ending each context, instead of decodes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"{args.dtype}, {args.threads} threads, heads {args.heads}/{args.kv_heads} kv, head_dim {args.head_dim}, "
          f"block size {args.block_size}, {args.layers} layers; ms per layer call (median of {args.repeats})")
    if args.chunk:
        print(f"{'batch':>5} {'chunk':>5} {'context':>7} {'kernel':>8} {'dense':>8} {'dense/kernel':>12}")
        for batch in args.batch:
            for chunk in args.chunk:
                for context in args.context:
                    ms = run_chunk(batch, chunk, max(context, chunk), args)
                    kernel = ms.get("kernel", float("nan"))
                    print(f"{batch:>5} {chunk:>5} {context:>7} {kernel:>8.3f} {ms['dense']:>8.3f} "
                          f"{ms['dense'] / kernel:>11.2f}x")
        return

    print(f"{'batch':>5} {'context':>7} {'kernel':>8} {'gather':>8} {'slot':>8} {'slot/kernel':>11}")
    for batch in args.batch:
        for context in args.context:
            ms = run(batch, context, args)
            kernel, gather = ms.get("kernel", float("nan")), ms.get("gather", float("nan"))
            print(f"{batch:>5} {context:>7} {kernel:>8.3f} {gather:>8.3f} {ms['slot']:>8.3f} "
                  f"{ms['slot'] / kernel:>10.2f}x")


if __name__ == "__main__":
    main()
