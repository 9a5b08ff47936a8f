"""Decides, each step, which sequences run and how many tokens each computes.

Decodes (one token per running sequence) always go first; the rest of the per-step budget
goes to prompt prefill, in chunks, so a long prompt can never stall the running streams for
more than one bounded step. The budget counts work, not just tokens: a prompt token late in
a long prompt attends over everything before it, so it costs more, and chunks shrink as the
prompt's context grows. A long prompt (more uncached tokens than one step's budget) can be
held to a smaller share while other streams decode (`prefill_budget_while_decoding`): the
running streams then see many short stalls instead of a few long ones, and the long prompt
waits longer for its first token. A waiting request is admitted only when a KV slot
is free: when the cache is full it waits; nobody is rejected or evicted.
"""

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from aserve.engine.kv_cache import KVCache
from aserve.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        # A step that reaches the end of the known tokens yields logits for the next one.
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, kv_cache: KVCache, max_num_batched_tokens: int, eos_token_ids: Iterable[int],
                 attention_context_per_token: float = math.inf, prefill_budget_while_decoding: int = 0) -> None:
        """`attention_context_per_token`: cached positions whose attention costs as much as one
        token's matmuls (ModelArgs.attention_context_per_token); inf counts tokens only.
        `prefill_budget_while_decoding`: prefill work per step (same units) for a long prompt
        while any sequence decodes; 0: no cap beyond the step budget."""
        self.kv_cache = kv_cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_budget_while_decoding = prefill_budget_while_decoding
        self._attention_weight = 1.0 / attention_context_per_token
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence, status: SequenceStatus) -> None:
        """Takes a sequence out (finished, aborted or failed) and frees its slot at once."""
        seq.status = status
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
            self.kv_cache.free_slot(seq.slot, seq.tokens(0, seq.num_computed))
            seq.slot = None

    def schedule(self) -> list[ScheduledSeq]:
        decodes = [ScheduledSeq(s, 1) for s in self.running if not s.in_prefill]
        budget = float(self.max_num_batched_tokens - len(decodes))
        prefills: list[ScheduledSeq] = []
        decoding = bool(decodes)
        for seq in self.running:
            if seq.in_prefill and (chunk := self._prefill_chunk(seq, budget, not prefills, decoding)):
                prefills.append(chunk)
                budget -= self.prefill_cost(seq.num_computed, chunk.num_tokens)
        for seq in list(self.waiting):
            if budget <= 0 or not self.kv_cache.num_free:
                break
            if seq.waits:  # a later choice of an n>1 request: its prompt's KV is on the way
                continue
            self.waiting.remove(seq)
            self._admit(seq)
            if not (chunk := self._prefill_chunk(seq, budget, not prefills, decoding)):
                break  # admitted: it prefills from the next step on
            prefills.append(chunk)
            budget -= self.prefill_cost(seq.num_computed, chunk.num_tokens)
        return decodes + prefills

    def _admit(self, seq: Sequence) -> Sequence:
        in_use = ((s.slot, s.tokens(0, s.num_computed)) for s in self.running if s.num_computed)
        # Prompt logprobs need every prompt position computed, except for a later choice of an
        # n>1 request: its prompt's logprobs are its leader's, so it copies the leader's KV.
        reuse = seq.params.prompt_logprobs is None
        leader = seq.wait_for
        shared = (leader.slot, leader.tokens(0, leader.num_computed)) if (
            leader is not None and not leader.status.finished and leader.num_computed) else None
        seq.slot, seq.num_computed = self.kv_cache.take_slot(seq.prompt_ids, in_use, reuse, shared)
        seq.num_cached_prompt = seq.num_computed
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return seq

    def prefill_cost(self, start: int, num_tokens: int) -> float:
        """A chunk's work in units of one token's matmuls: each token also attends over the
        (start + num_tokens) positions before it, at most."""
        return num_tokens * (1.0 + (start + num_tokens) * self._attention_weight)

    def _prefill_chunk(self, seq: Sequence, budget: float, first: bool, decoding: bool) -> ScheduledSeq | None:
        cap = self.prefill_budget_while_decoding
        if cap and decoding and len(seq.prompt_ids) - seq.num_cached_prompt > self.max_num_batched_tokens:
            budget = min(budget, float(cap))
        # The largest n with prefill_cost(start, n) <= budget: a n^2 + b n - budget <= 0.
        a, b = self._attention_weight, 1.0 + seq.num_computed * self._attention_weight
        n = budget / b if a == 0 else (math.sqrt(max(b * b + 4 * a * budget, 0.0)) - b) / (2 * a)
        # The step's first chunk always makes progress, even when decodes used the budget up.
        n = max(int(n), 1 if first else 0)
        n = min(n, len(seq.prompt_ids) - seq.num_computed)
        return ScheduledSeq(seq, n) if n > 0 else None

    def ends(self, seq: Sequence, token: int) -> bool:
        """Whether `token` ends `seq` as a stop (EOS unless ignored, or one of its stop_token_ids)."""
        return (token in self.eos_token_ids and not seq.params.ignore_eos) or token in seq.params.stop_token_ids

    def postprocess(self, scheduled: list[ScheduledSeq], tokens: list[int | None]) -> list[tuple[Sequence, int]]:
        """Records the step's results; returns (sequence, new token) pairs. Finished sequences
        leave the batch here, so their slots are free for the very next step."""
        new_tokens = []
        for item, token in zip(scheduled, tokens):
            seq = item.seq
            if seq.status.finished:  # aborted while the step ran
                continue
            seq.num_computed += item.num_tokens
            if token is None:
                continue
            seq.output_ids.append(token)
            new_tokens.append((seq, token))
            if self.ends(seq, token):
                self.remove(seq, SequenceStatus.FINISHED_STOPPED)
            elif len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.kv_cache.max_len:
                self.remove(seq, SequenceStatus.FINISHED_LENGTH)
        return new_tokens
