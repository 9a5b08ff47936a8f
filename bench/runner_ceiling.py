"""The model runner alone, no HTTP: decode steps/s and tokens/s per batch size.

This is the ceiling the whole server can approach: `python bench/runner_ceiling.py
--batch 1 8 32 --context 128 512 2048`. For each context length and batch size it prefills
`batch` sequences of `context` tokens into the paged KV cache, then times decode steps
(batched forward + sampling + the host sync that reads tokens) at that context.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from aserve.engine.block_manager import BlockManager
from aserve.engine.kv_cache import KVCache
from aserve.engine.model_runner import ModelRunner
from aserve.engine.scheduler import ScheduledSeq
from aserve.engine.sequence import SamplingParams, Sequence, SequenceStatus
from aserve.models.loader import LoadedModel, load_model
from aserve.models.store import default_cache_dir, resolve_model


def paged_runner(loaded: LoadedModel, batch: int, max_len: int, block_size: int = 16) -> ModelRunner:
    """A runner with just the KV blocks that `batch` sequences of `max_len` tokens need."""
    blocks = batch * -(-max_len // block_size)
    kv = KVCache.allocate(loaded.args, blocks * KVCache.bytes_per_block(loaded.args, block_size, loaded.dtype),
                          block_size, loaded.dtype, loaded.device)
    return ModelRunner(loaded.model, kv, BlockManager(kv.num_blocks, kv.block_size, prefix_caching=False),
                       loaded.device, seed=0)


def prefill(runner: ModelRunner, prompts: list[list[int]]) -> list[Sequence]:
    """Greedy sequences, each prompt prefilled alone into its own blocks, holding its first token."""
    seqs = [Sequence(f"s{i}", ids, SamplingParams(max_tokens=10**6, temperature=0), status=SequenceStatus.RUNNING)
            for i, ids in enumerate(prompts)]
    for seq in seqs:
        assert runner.blocks.allocate(seq, reuse=False)
        seq.output_ids = [runner.run([ScheduledSeq(seq, len(seq.prompt_ids))]).tokens[0]]
        seq.num_computed = len(seq.prompt_ids)
    return seqs


def decode_step(runner: ModelRunner, seqs: list[Sequence]) -> None:
    """One batched decode step: every sequence gets its next token (and a new block at a boundary)."""
    for seq in seqs:
        assert runner.blocks.reserve(seq, seq.num_computed + 1)
    for seq, token in zip(seqs, runner.run([ScheduledSeq(s, 1) for s in seqs]).tokens):
        seq.num_computed += 1
        seq.output_ids.append(token)


def measure(runner: ModelRunner, batch: int, context: int, steps: int) -> float:
    seqs = prefill(runner, [[(7 * i + j) % 1000 + 10 for j in range(context)] for i in range(batch)])  # untimed
    # One untimed decode step first: the first call at a new (batch, context) shape pays one-off
    # costs (allocator growth, kernel selection) that would otherwise inflate the first point.
    decode_step(runner, seqs)
    start = time.perf_counter()
    for _ in range(steps):
        decode_step(runner, seqs)
    elapsed = time.perf_counter() - start
    for seq in seqs:
        runner.blocks.free(seq)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF dir or .gguf (default: the default model)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, nargs="+", default=[128],
                        help="prompt lengths in tokens already in the KV cache when decoding starts")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--block-size", type=int, default=16, help="positions per KV-cache block")
    parser.add_argument("--json", metavar="PATH", help="also write [{context, batch, step_ms, tokens_per_s}] here")
    parser.add_argument("--quantization", default="auto", help="auto | none | int4 | fp16 (see aserve/models/quantize.py)")
    args = parser.parse_args()
    if args.steps < 1 or min(args.batch) < 1 or min(args.context) < 1:
        parser.error("--steps, --batch and --context must be >= 1")
    path = resolve_model(args.model, default_cache_dir())
    longest = max(args.context) + args.steps + 2
    loaded = load_model(Path(path), args.device, args.dtype, longest, quantization=args.quantization)
    runner = paged_runner(loaded, max(args.batch), longest, args.block_size)
    if longest > loaded.max_model_len:
        parser.error(f"--context {max(args.context)} + --steps {args.steps} exceeds the model's context "
                     f"{loaded.max_model_len}")
    print(f"threads={torch.get_num_threads()} context={' '.join(map(str, args.context))} dtype={loaded.dtype} quantization={args.quantization}")
    print("context  batch  step_ms  tokens/s", flush=True)
    points = []
    for context in args.context:
        for batch in args.batch:
            elapsed = measure(runner, batch, context, args.steps)
            points.append({"context": context, "batch": batch, "step_ms": 1000 * elapsed / args.steps,
                           "tokens_per_s": batch * args.steps / elapsed})
            print(f"{context:7d}  {batch:5d}  {points[-1]['step_ms']:7.1f}  {points[-1]['tokens_per_s']:8.1f}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(points, indent=2))


if __name__ == "__main__":
    main()
