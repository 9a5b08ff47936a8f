"""Turns a scheduled step into tensors, runs the model and samples. Runs on the worker thread."""

from collections.abc import Sequence as Seq

import torch

from aserve.engine.kv_cache import KVCache
from aserve.engine.sampler import sample
from aserve.engine.scheduler import ScheduledSeq
from aserve.models.batch import ForwardBatch, PrefillChunk
from aserve.models.llama import LlamaModel


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device, seed: int | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.generator = torch.Generator(device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def run(self, scheduled: Seq[ScheduledSeq]) -> list[int | None]:
        """Returns, per scheduled sequence, its next token, or None for a prefill chunk
        that has not reached the end of its prompt yet."""
        # Grad mode is thread-local, so it must be set here, on the thread that runs the model.
        with torch.inference_mode():
            self.kv_cache.apply_pending_copies()
            batch = self._build_batch(scheduled)
            logits = self.model(batch, self.kv_cache.k, self.kv_cache.v)
            sampling = [s.seq for s in scheduled if s.samples]
            tokens = sample(logits, [s.params for s in sampling], [s.generator for s in sampling], self.generator)
            token_list = tokens.tolist()  # the step's one host sync
        it = iter(token_list)
        return [next(it) if s.samples else None for s in scheduled]

    def _build_batch(self, scheduled: Seq[ScheduledSeq]) -> ForwardBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        decode_slots: list[int] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        for item in scheduled:
            seq, start = item.seq, item.seq.num_computed
            span = range(start, start + item.num_tokens)
            input_ids.extend(seq.tokens(span.start, span.stop))
            positions.extend(span)
            slots.extend([seq.slot] * item.num_tokens)
            if item.samples:
                logits_indices.append(len(input_ids) - 1)
            if seq.in_prefill:
                prefills.append(PrefillChunk(seq.slot, start, item.num_tokens))
            else:
                decode_slots.append(seq.slot)
                decode_lens.append(start + 1)
        decode_bias = None
        decode_rows = max(decode_slots, default=-1) + 1
        if decode_slots:
            lens = torch.ones(decode_rows, dtype=torch.long)  # idle rows see position 0 only, to stay finite
            lens[decode_slots] = torch.tensor(decode_lens)
            hidden = torch.arange(max(decode_lens)).unsqueeze(0) >= lens.unsqueeze(1)
            # In the cache's dtype, built once per step rather than cast in each layer.
            bias = torch.zeros(hidden.shape, dtype=self.kv_cache.k.dtype).masked_fill_(hidden, float("-inf"))
            decode_bias = bias[:, None, None, :]
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long).to(self.device, non_blocking=True)  # noqa: E731
        return ForwardBatch(
            input_ids=as_tensor(input_ids),
            positions=as_tensor(positions),
            token_slots=as_tensor(slots),
            decode_slots=as_tensor(decode_slots),
            decode_rows=decode_rows,
            decode_bias=None if decode_bias is None else decode_bias.to(self.device, non_blocking=True),
            prefills=prefills,
            logits_indices=as_tensor(logits_indices),
        )
