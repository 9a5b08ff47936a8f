"""Turns a scheduled step into tensors, runs the model and samples. Runs on the worker thread."""

import math
from collections.abc import Callable, Collection
from collections.abc import Sequence as Seq
import time
from dataclasses import dataclass

import torch

from aserve.engine.block_manager import BlockManager
from aserve.engine.kv_cache import KVCache
from aserve.engine.lora_slots import AdapterSlots
from aserve.engine.sampler import TokenLogprobs, prompt_logprobs, sample
from aserve.engine.scheduler import ScheduledSeq
from aserve.models.batch import ForwardBatch, PrefillChunk
from aserve.models import cpu_kernels
from aserve.models.llama import LlamaModel
from aserve.models.paged_attention import attention_backend
from aserve.models.lora import load_into_slot


@dataclass(slots=True)
class StepOutput:
    """Per scheduled sequence, in the step's order."""

    tokens: list[int | None]  # the next token; None for a prefill chunk short of its prompt's end
    logprobs: list[TokenLogprobs | None]  # for the next token, where asked
    prompt_logprobs: list[list[TokenLogprobs] | None]  # for the prompt tokens this chunk predicts, where asked
    # a pooling request's embedding once its prompt is computed (float32 [hidden], unnormalized)
    embeddings: list[torch.Tensor | None] | None = None

    def __add__(self, other: "StepOutput") -> "StepOutput":
        return StepOutput(self.tokens + other.tokens, self.logprobs + other.logprobs,
                          self.prompt_logprobs + other.prompt_logprobs,
                          (self.embeddings or [None] * len(self.tokens)) + (other.embeddings or [None] * len(other.tokens)))


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, blocks: BlockManager, device: torch.device,
                 seed: int | None = None, eos_token_ids: Collection[int] = (),
                 loras: AdapterSlots | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.blocks = blocks  # its pending block copies run here, before each forward
        self.device = device
        self.eos_token_ids = tuple(eos_token_ids)  # masked while a sequence is short of min_tokens
        self.loras = loras  # adapter slots the scheduler assigned are filled here, between forwards
        self.last_forward_s = 0.0  # the last step's forward and sampling: paces adapter loads
        # Called with (scheduled, logits) after each forward: tests inject faults here (raise, or
        # write NaN into the logits) to check that only the affected requests fail.
        self.fault_hook: Callable[[Seq[ScheduledSeq], torch.Tensor], None] | None = None
        self.paged_chunk_max = paged_chunk_max(device, model.args.head_dim)
        self.h2d = HostToDevice(device)
        self.generator = torch.Generator(device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def run(self, scheduled: Seq[ScheduledSeq]) -> StepOutput:
        # Grad mode is thread-local, so it must be set here, on the thread that runs the model.
        with torch.inference_mode():
            self.kv_cache.copy_blocks(self.blocks.take_copies())
            if self.loras is not None:
                self.load_adapters(self.last_forward_s / 2)
            batch, prompt_rows = self._build_batch(scheduled)
            started = time.perf_counter()
            logits, pooled = self.model.forward_pooled(batch, self.kv_cache.k, self.kv_cache.v)
            if self.fault_hook is not None:
                self.fault_hook(scheduled, logits)
            sampling = [s.seq for s in scheduled if s.samples]
            sampled = sample(logits[: len(sampling)], sampling, self.generator, self.eos_token_ids)
            # A row with NaN or inf logits samples garbage: mark it, in the same transfer as the tokens.
            # Its sum is then NaN or inf too, and summing is one vectorized pass where
            # isfinite().all() made four (6 ms of a 76 ms batch-64 step of the default model; 0.1 ms
            # this way). Only finite logits near 1e34 could overflow the sum: a broken model anyway.
            finite = logits[: len(sampling)].sum(dim=-1).isfinite()
            sampled.tokens = sampled.tokens.masked_fill(~finite, -1)
            token_list, logprob_list = sampled.to_host(sampling)  # the step's one host sync (without logprobs)
            self.last_forward_s = time.perf_counter() - started
            if -1 in token_list:
                # The engine then reruns the step's sequences one by one and fails only those that fail alone.
                raise FloatingPointError(f"non-finite logits for {token_list.count(-1)} of {len(token_list)} sequences")
            prompt_lps: list[list[TokenLogprobs] | None] = [None] * len(scheduled)
            row = len(sampling)
            for index, next_tokens in prompt_rows:
                k = scheduled[index].seq.params.prompt_logprobs or 0
                prompt_lps[index] = prompt_logprobs(logits[row : row + len(next_tokens)], next_tokens, k)
                row += len(next_tokens)
        tokens, logprobs = iter(token_list), iter(logprob_list)
        vectors = iter(pooled if pooled is not None else ())
        return StepOutput([next(tokens) if s.samples else None for s in scheduled],
                          [next(logprobs) if s.samples else None for s in scheduled], prompt_lps,
                          [next(vectors) if s.pools else None for s in scheduled])

    def load_adapters(self, budget_s: float | None = None) -> None:
        """Fills LoRA slots a layer at a time for about `budget_s` (at least one layer; None:
        until every slot is ready). On the model thread, between forwards."""
        assert self.loras is not None
        deadline = None if budget_s is None else time.perf_counter() + budget_s
        with torch.inference_mode():
            while (load := self.loras.next_load(len(self.model.layers))) is not None:
                slot, adapter, layer = load
                load_into_slot(self.model, slot, adapter, range(layer, layer + 1))
                if deadline is not None and time.perf_counter() >= deadline:
                    break

    def _build_batch(self, scheduled: Seq[ScheduledSeq]) -> tuple[ForwardBatch, list[tuple[int, list[int]]]]:
        """Also returns, for each chunk that wants prompt logprobs, (its index, the prompt tokens
        its positions predict); their logits rows follow the sampling rows, in that order.

        Decodes and chunks the paged attention op serves (_is_paged) go first; the other
        chunks follow, each attended densely (batch.py)."""
        size = self.kv_cache.block_size
        is_paged = [_is_paged(item, self.paged_chunk_max) for item in scheduled]
        order = sorted(range(len(scheduled)), key=lambda i: not is_paged[i])  # stable: paged first, in step order
        input_ids: list[int] = []
        positions: list[int] = []
        token_blocks: list[int] = []  # the block each token's key/value goes to
        first_token: dict[int, int] = {}  # scheduled index -> index of its first token in the batch
        lora_slots: list[int] = []  # each token's LoRA slot, -1 for the base model (with LoRA enabled)
        block_tables: list[list[int]] = []
        query_rows: list[int] = []
        context_lens: list[int] = []
        dense: list[tuple[list[int], int, int]] = []  # (blocks, start, length) of the chunks attended densely
        for index in order:
            item = scheduled[index]
            seq, start = item.seq, item.seq.num_computed
            span = range(start, start + item.num_tokens)
            first_token[index] = len(input_ids)
            if self.loras is not None:
                lora_slots.extend([-1 if seq.lora_slot is None else seq.lora_slot] * item.num_tokens)
            input_ids.extend(seq.tokens(span.start, span.stop))
            positions.extend(span)
            token_blocks.extend(seq.block_table[p // size] for p in span)
            if is_paged[index]:
                query_rows.extend([len(block_tables)] * item.num_tokens)
                context_lens.extend(range(span.start + 1, span.stop + 1))
                block_tables.append(seq.block_table)
            else:
                dense.append((seq.block_table[: self.blocks.blocks_for(span.stop)], start, item.num_tokens))
        logits_indices: list[int] = []
        pooling_indices: list[int] = []
        prompt_indices: list[int] = []
        prompt_rows: list[tuple[int, list[int]]] = []
        for index, item in enumerate(scheduled):
            seq, start, first = item.seq, item.seq.num_computed, first_token[index]
            if item.samples:
                logits_indices.append(first + item.num_tokens - 1)
            elif item.pools:
                pooling_indices.append(first + item.num_tokens - 1)
            if seq.params.prompt_logprobs is not None:
                # Position p predicts prompt token p + 1; the prompt's last position samples
                # instead. Positions computed before a preemption already had theirs sent.
                skip = max(seq.max_computed - start, 0)
                predicts = seq.prompt_ids[start + skip + 1 : start + item.num_tokens + 1]
                if predicts:
                    prompt_indices.extend(range(first + skip, first + skip + len(predicts)))
                    prompt_rows.append((index, predicts))
        width = max((len(t) for t in block_tables), default=0)
        padded = [b for t in block_tables for b in t + [0] * (width - len(t))]  # padding is never read
        with_lora = any(slot >= 0 for slot in lora_slots)
        (ids, pos, blocks, tables, rows, lens, logits_at, lora, pooling, *chunk_blocks) = self.h2d.send(
            [input_ids, positions, token_blocks, padded, query_rows, context_lens, logits_indices + prompt_indices,
             lora_slots if with_lora else [], pooling_indices, *(blocks for blocks, _, _ in dense)])
        int32 = torch.int32
        return ForwardBatch(
            input_ids=ids,
            positions=pos,
            token_blocks=blocks,
            token_offsets=pos % size,
            block_tables=tables.to(int32).view(len(block_tables), width),
            query_rows=rows.to(int32),
            context_lens=lens.to(int32),
            prefills=[PrefillChunk(b, start, length) for b, (_, start, length) in zip(chunk_blocks, dense)],
            logits_indices=logits_at,
            lora_slots=lora if with_lora else None,
            pooling_indices=pooling if pooling_indices else None,
        ), prompt_rows


# A prefill chunk with positions cached before it attends through the paged kernel when it is
# this short or the kernel's vectors are AVX-512 wide; longer ones gather their context for
# SDPA. The kernel attends a chunk's tokens together, in tiles of small matrix products. Per
# layer, bfloat16, SmolLM2 shapes, 16 sequences at context 1,600 (`python
# bench/paged_attention.py --dtype bfloat16 --batch 1 16 --chunk 8 21 256 --context 1600`, the
# 2-core AMD EPYC of 2026-12-04): built for AVX-512 it was 1.2-1.9x faster than gathering for
# SDPA at every chunk length (2.0-3.2x with AVX512-BF16's pair products, 2026-12-05); built for
# AVX2 only (-march=haswell, with torch limited to AVX2 too), 1.1-1.4x faster up to 21 tokens
# and 0.6x at 256.
PAGED_CHUNK_MAX_AVX2 = 32


class HostToDevice:
    """A step's index tensors travel together: packed into one host buffer, copied in one
    non-blocking transfer, split into views on the device. On CUDA the buffer is pinned and
    reused, so the copy is one DMA that does not stall the host (pageable memory would be staged
    through a bounce buffer, one small synchronous copy per list). On the CPU the views are of
    the host tensor itself: no copy at all."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned: torch.Tensor | None = None
        self._sent: torch.cuda.Event | None = None  # recorded after the last copy out of _pinned

    def send(self, parts: list[list[int]]) -> list[torch.Tensor]:
        flat = torch.tensor([x for part in parts for x in part], dtype=torch.long)
        if self.device.type == "cuda":
            if self._sent is not None:
                self._sent.synchronize()  # the last copy has read the buffer (a failed step never synced)
            if self._pinned is None or self._pinned.numel() < flat.numel():
                self._pinned = torch.empty(max(flat.numel(), 4096), dtype=torch.long, pin_memory=True)
            staged = self._pinned[: flat.numel()]
            staged.copy_(flat)
            flat = staged.to(self.device, non_blocking=True)
            self._sent = torch.cuda.Event()
            self._sent.record(torch.cuda.current_stream(self.device))
        elif self.device.type != "cpu":
            flat = flat.to(self.device)
        return list(flat.split([len(part) for part in parts]))


def paged_chunk_max(device: torch.device, head_dim: int) -> float:
    """The longest prefill chunk (over cached positions) that attends through the paged op."""
    if attention_backend(device) != "kernel":
        return 1  # the torch path copies the context once per token: chunks gather it once instead
    width = cpu_kernels.vector_width()
    if head_dim % width:
        return 1  # no tiles for this head size: the kernel would read the context once per token
    return math.inf if width >= 16 else PAGED_CHUNK_MAX_AVX2


def _is_paged(item: ScheduledSeq, chunk_max: float) -> bool:
    return item.num_tokens == 1 or (item.seq.num_computed > 0 and item.num_tokens <= chunk_max)
