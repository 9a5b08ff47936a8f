"""Turns a scheduled step into tensors, runs the model and samples. Runs on the worker thread."""

from collections.abc import Callable, Collection
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from aserve.engine.kv_cache import KVCache
from aserve.engine.sampler import TokenLogprobs, prompt_logprobs, sample
from aserve.engine.scheduler import ScheduledSeq
from aserve.models.batch import ForwardBatch, PrefillChunk
from aserve.models.llama import LlamaModel


@dataclass(slots=True)
class StepOutput:
    """Per scheduled sequence, in the step's order."""

    tokens: list[int | None]  # the next token; None for a prefill chunk short of its prompt's end
    logprobs: list[TokenLogprobs | None]  # for the next token, where asked
    prompt_logprobs: list[list[TokenLogprobs] | None]  # for the prompt tokens this chunk predicts, where asked

    def __add__(self, other: "StepOutput") -> "StepOutput":
        return StepOutput(self.tokens + other.tokens, self.logprobs + other.logprobs,
                          self.prompt_logprobs + other.prompt_logprobs)


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device, seed: int | None = None,
                 eos_token_ids: Collection[int] = ()) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.eos_token_ids = tuple(eos_token_ids)  # masked while a sequence is short of min_tokens
        # Called with (scheduled, logits) after each forward: tests inject faults here (raise, or
        # write NaN into the logits) to check that only the affected requests fail.
        self.fault_hook: Callable[[Seq[ScheduledSeq], torch.Tensor], None] | None = None
        self.generator = torch.Generator(device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)

    def run(self, scheduled: Seq[ScheduledSeq]) -> StepOutput:
        # Grad mode is thread-local, so it must be set here, on the thread that runs the model.
        with torch.inference_mode():
            self.kv_cache.apply_pending_copies()
            batch, prompt_rows = self._build_batch(scheduled)
            logits = self.model(batch, self.kv_cache.k, self.kv_cache.v)
            if self.fault_hook is not None:
                self.fault_hook(scheduled, logits)
            sampling = [s.seq for s in scheduled if s.samples]
            sampled = sample(logits[: len(sampling)], sampling, self.generator, self.eos_token_ids)
            # A row with NaN or inf logits samples garbage: mark it, in the same transfer as the tokens.
            finite = torch.isfinite(logits[: len(sampling)]).all(dim=-1)
            sampled.tokens = sampled.tokens.masked_fill(~finite, -1)
            token_list, logprob_list = sampled.to_host(sampling)  # the step's one host sync (without logprobs)
            if -1 in token_list:
                # The engine then reruns the step's sequences one by one and fails only those that fail alone.
                raise FloatingPointError(f"non-finite logits for {token_list.count(-1)} of {len(token_list)} sequences")
            prompt_lps: list[list[TokenLogprobs] | None] = [None] * len(scheduled)
            row = len(sampling)
            for index, next_tokens in prompt_rows:
                k = scheduled[index].seq.params.prompt_logprobs or 0
                prompt_lps[index] = prompt_logprobs(logits[row : row + len(next_tokens)], next_tokens, k)
                row += len(next_tokens)
        for seq, token in zip(sampling, token_list):
            if seq.guide is not None:
                seq.guide.accept(token)
        tokens, logprobs = iter(token_list), iter(logprob_list)
        return StepOutput([next(tokens) if s.samples else None for s in scheduled],
                          [next(logprobs) if s.samples else None for s in scheduled], prompt_lps)

    def _build_batch(self, scheduled: Seq[ScheduledSeq]) -> tuple[ForwardBatch, list[tuple[int, list[int]]]]:
        """Also returns, for each chunk that wants prompt logprobs, (its index, the prompt tokens
        its positions predict); their logits rows follow the sampling rows, in that order."""
        input_ids: list[int] = []
        prompt_indices: list[int] = []
        prompt_rows: list[tuple[int, list[int]]] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        decode_slots: list[int] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        for index, item in enumerate(scheduled):
            seq, start = item.seq, item.seq.num_computed
            span = range(start, start + item.num_tokens)
            input_ids.extend(seq.tokens(span.start, span.stop))
            positions.extend(span)
            slots.extend([seq.slot] * item.num_tokens)
            if item.samples:
                logits_indices.append(len(input_ids) - 1)
            if seq.params.prompt_logprobs is not None and seq.in_prefill:
                # Position p predicts prompt token p + 1; the prompt's last position samples instead.
                predicts = seq.prompt_ids[start + 1 : start + item.num_tokens + 1]
                if predicts:
                    first = len(input_ids) - item.num_tokens
                    prompt_indices.extend(range(first, first + len(predicts)))
                    prompt_rows.append((index, predicts))
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
            logits_indices=as_tensor(logits_indices + prompt_indices),
        ), prompt_rows
