"""The model runner alone, no HTTP: decode steps/s and tokens/s per batch size.

This is the ceiling the whole server can approach: `python bench/runner_ceiling.py
--batch 1 8 32 --context 128 512 2048`. For each context length and batch size it prefills
`batch` sequences of `context` tokens into the paged KV cache, then times decode steps
(batched forward + sampling + the host sync that reads tokens) at that context.

Decode is bound by memory bandwidth: each step reads every weight once and each sequence's
keys and values. The GB/s column is those bytes over the step's time; with --peak-gbps (on
CUDA by default the device-to-device copy rate measured at start, which counts bytes read and
written) it also gives the fraction of that peak. `--model DIR --random-weights` measures a
model shape whose weights are not at hand (bench/model_shape.py writes one).
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


def weight_bytes(model: torch.nn.Module, batch: int) -> int:
    """Bytes of weights a decode step of `batch` rows reads: everything but the embedding table,
    of which it gathers a row per token (unless the output head is tied to it, then that is read
    whole). A quantized linear with a dense copy for larger batches (models/quantize.py) counts
    whichever of the two the batch uses."""
    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    total = 0
    for module in model.modules():
        dense = getattr(module, "dense", None)
        if isinstance(dense, torch.nn.Module) and batch >= module.dense_from:
            # Its weight may be a plain tensor attribute (OneDNNLinear's prepacked one).
            attributes = (t for t in vars(dense).values() if isinstance(t, torch.Tensor))
            total += size(dense.parameters()) + size(dense.buffers()) + size(attributes)
            total += size(t for name, t in module.named_parameters(recurse=False) if name == "bias")
        else:
            # A weight may be a plain tensor attribute (OneDNNLinear's prepacked one, and its bias).
            plain = (t for t in vars(module).values() if isinstance(t, torch.Tensor) and module is not model)
            total += size(module.parameters(recurse=False)) + size(module.buffers(recurse=False)) + size(plain)
    embed = model.embed_tokens.weight
    tied = getattr(model.lm_head, "weight", None) is embed
    return total - (0 if tied else embed.numel() * embed.element_size())


def kv_bytes(loaded: LoadedModel, batch: int, context: int) -> int:
    """Keys and values a decode step reads at this batch and context."""
    a = loaded.args
    return batch * context * a.num_layers * 2 * a.num_kv_heads * a.head_dim * torch.finfo(loaded.dtype).bits // 8


def copy_gbps(device: torch.device, size: int = 1 << 30) -> float:
    """A device-to-device copy's rate, bytes read and written, GB/s (the best of 5, after one
    untimed)."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best / 1e9


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
    parser.add_argument("--json", metavar="PATH", help="also write [{context, batch, step_ms, tokens_per_s, gb_per_s, of_peak}] here")
    parser.add_argument("--quantization", default="auto", help="auto | none | int4 | fp16 (see aserve/models/quantize.py)")
    parser.add_argument("--random-weights", action="store_true", help="initialize randomly: only --model's config is read")
    parser.add_argument("--peak-gbps", type=float, help="memory bandwidth to compare with (default on CUDA: measured)")
    args = parser.parse_args()
    if args.steps < 1 or min(args.batch) < 1 or min(args.context) < 1:
        parser.error("--steps, --batch and --context must be >= 1")
    path = resolve_model(args.model, default_cache_dir())
    longest = max(args.context) + args.steps + 2
    loaded = load_model(Path(path), args.device, args.dtype, longest, random_weights=args.random_weights,
                        quantization=args.quantization)
    runner = paged_runner(loaded, max(args.batch), longest, args.block_size)
    if longest > loaded.max_model_len:
        parser.error(f"--context {max(args.context)} + --steps {args.steps} exceeds the model's context "
                     f"{loaded.max_model_len}")
    peak = args.peak_gbps or (copy_gbps(loaded.device) if loaded.device.type == "cuda" else None)
    print(f"device={loaded.device} threads={torch.get_num_threads()} context={' '.join(map(str, args.context))} "
          f"dtype={loaded.dtype} quantization={args.quantization} weights read at batch 1={weight_bytes(loaded.model, 1) / 1e9:.3f} GB"
          + (f" peak={peak:.0f} GB/s" if peak else ""))
    print("context  batch  step_ms  tokens/s     GB/s" + ("  of peak" if peak else ""), flush=True)
    points = []
    for context in args.context:
        for batch in args.batch:
            elapsed = measure(runner, batch, context, args.steps)
            step_s = elapsed / args.steps
            gbps = (weight_bytes(loaded.model, batch) + kv_bytes(loaded, batch, context)) / step_s / 1e9
            points.append({"context": context, "batch": batch, "step_ms": 1000 * step_s,
                           "tokens_per_s": batch * args.steps / elapsed, "gb_per_s": gbps,
                           "of_peak": gbps / peak if peak else None})
            print(f"{context:7d}  {batch:5d}  {points[-1]['step_ms']:7.1f}  {points[-1]['tokens_per_s']:8.1f}  "
                  f"{gbps:7.1f}" + (f"  {100 * gbps / peak:6.1f} %" if peak else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(points, indent=2))


if __name__ == "__main__":
    main()
