"""Decides, each step, which sequences run and how many tokens each computes.

Decodes (one token per running sequence) always go first; the rest of the per-step budget
goes to prompt prefill, in chunks, so a long prompt can never stall the running streams for
more than one bounded step. The budget counts work, not just tokens: a prompt token late in
a long prompt attends over everything before it, so it costs more, and chunks shrink as the
prompt's context grows. A long prompt (more uncached tokens than one step's budget) can be
held to a smaller share while other streams decode (`prefill_budget_while_decoding`), to its
last chunk: the running streams then see many short stalls instead of a few long ones, and the
long prompt waits longer for its first token.

Memory is paged (block_manager.py). A waiting request is admitted, first come first served,
while fewer than `max_num_seqs` run and the free blocks hold its prompt; otherwise it waits
and nobody is rejected. A decode that crosses into a new block when none is free preempts the
most recently admitted running sequence (vLLM v1's policy): its blocks are freed and it goes
back to the head of the queue, to be recomputed, prompt and output so far, when blocks free
up. Its full blocks stay named in the prefix cache, so the recompute is often a cache hit.
Nothing it already streamed is sent again or changed: the recompute only yields the next token.
"""

import asyncio
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from aserve.engine.block_manager import BlockManager
from aserve.engine.lora_slots import AdapterSlots
from aserve.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed

    @property
    def completes(self) -> bool:
        """The step reaches the end of the known tokens."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens

    @property
    def samples(self) -> bool:
        """It yields logits for the next token."""
        return self.completes and not self.seq.params.pooling

    @property
    def pools(self) -> bool:
        """A pooling request's prompt is computed: it yields its embedding instead."""
        return self.completes and self.seq.params.pooling


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 eos_token_ids: Iterable[int], attention_context_per_token: float = math.inf,
                 prefill_budget_while_decoding: int = 0, loras: AdapterSlots | None = None,
                 whole_prompts: bool = False) -> None:
        """`attention_context_per_token`: cached positions whose attention costs as much as one
        token's matmuls (ModelArgs.attention_context_per_token); inf counts tokens only.
        `prefill_budget_while_decoding`: prefill work per step (same units) for a long prompt
        while any sequence decodes; 0: no cap beyond the step budget."""
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.prefill_budget_while_decoding = prefill_budget_while_decoding
        self._attention_weight = 1.0 / attention_context_per_token
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the last is preempted first
        self.num_preemptions = 0
        # Admission next to running sequences leaves this many blocks free for them to grow
        # into: a prompt that took the last free block would only get somebody preempted soon.
        self.watermark = blocks.num_blocks // 100
        self.loras = loras
        self.whole_prompts = whole_prompts  # encoders: never a partial chunk (engine/encoder_runner.py)
        self.owner: asyncio.Task | None = None  # the step loop's task, once it runs (EngineLoop.run)

    def add(self, seq: Sequence) -> None:
        self._owned()
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence, status: SequenceStatus) -> None:
        """Takes a sequence out (finished, aborted or failed) and frees its blocks at once."""
        self._owned()
        seq.status = status
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        # Also for a waiting one: an admission that failed half-way may have left it some.
        self.blocks.free(seq)
        self._release_lora(seq)

    def schedule(self) -> list[ScheduledSeq]:
        self._owned()
        decodes = []
        for seq in list(self.running):
            if seq.status == SequenceStatus.RUNNING and not seq.in_prefill and self._lora_ready(seq) and self._grow(seq):
                decodes.append(ScheduledSeq(seq, 1))
        budget = float(self.max_num_batched_tokens - len(decodes))
        prefills: list[ScheduledSeq] = []
        decoding = bool(decodes)
        for seq in self.running:
            if seq.in_prefill and self._lora_ready(seq) and \
                    (chunk := self._prefill_chunk(seq, budget, not prefills, decoding)):
                prefills.append(chunk)
                budget -= self.prefill_cost(seq.num_computed, chunk.num_tokens)
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if seq.waits:  # a later choice of an n>1 request: its prompt's KV is on the way
                continue
            if not self._admit(seq):
                break  # first come, first served: nobody overtakes a prompt that does not fit yet
            if not self._lora_ready(seq):
                continue  # admitted: it prefills once the model runner has filled its adapter's slot
            if not (chunk := self._prefill_chunk(seq, budget, not prefills, decoding)):
                break  # admitted: it prefills from the next step on
            prefills.append(chunk)
            budget -= self.prefill_cost(seq.num_computed, chunk.num_tokens)
        return decodes + prefills

    def _grow(self, seq: Sequence) -> bool:
        """Blocks for `seq`'s next token, preempting the most recently admitted sequences until
        there are; False when `seq` itself had to go."""
        while not self.blocks.reserve(seq, seq.num_computed + 1):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Frees a running sequence's blocks and puts it at the head of the queue."""
        self.running.remove(seq)
        self.blocks.free(seq)
        self._release_lora(seq)
        seq.num_computed = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit(self, seq: Sequence) -> bool:
        # Prompt logprobs need every prompt position computed, unless they were all sent before a
        # preemption. A later choice of an n>1 request takes its leader's prompt KV instead (its
        # prompt's logprobs are its leader's).
        reuse = seq.params.prompt_logprobs is None or seq.max_computed >= len(seq.prompt_ids) - 1
        if seq.lora is not None:
            assert self.loras is not None, "a LoRA sequence on an engine without adapters"
            if (slot := self.loras.acquire(seq.lora)) is None:
                return False  # every slot serves other adapters' running sequences: wait for one
            seq.lora_slot = slot
        if not self.blocks.allocate(seq, reuse, seq.leader, self.watermark if self.running else 0):
            self._release_lora(seq)
            return False
        seq.wait_for = None  # from now on its tokens are its own
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return True

    def _lora_ready(self, seq: Sequence) -> bool:
        return seq.lora_slot is None or self.loras is None or self.loras.ready(seq.lora_slot)

    def loading_adapters(self) -> bool:
        """Whether admitted sequences wait for the model runner to fill their adapter's slot."""
        return self.loras is not None and bool(self.loras.loading)

    def _release_lora(self, seq: Sequence) -> None:
        if seq.lora_slot is not None and self.loras is not None:
            self.loras.release(seq.lora_slot)
            seq.lora_slot = None

    def prefill_cost(self, start: int, num_tokens: int) -> float:
        """A chunk's work in units of one token's matmuls: each token also attends over the
        (start + num_tokens) positions before it, at most."""
        return num_tokens * (1.0 + (start + num_tokens) * self._attention_weight)

    def _prefill_chunk(self, seq: Sequence, budget: float, first: bool, decoding: bool) -> ScheduledSeq | None:
        cap = self.prefill_budget_while_decoding
        # A preempted stream resuming is not held back: its client is already waiting mid-answer.
        # A long prompt is one whose uncached part was longer than a step's budget at admission:
        # it stays capped to its last chunk, which would otherwise stall the others for a whole
        # step over its longest context (760 ms with 4,000 tokens on the 2-core EPYC).
        long = seq.num_tokens - seq.num_cached_prompt > self.max_num_batched_tokens
        if cap and decoding and not seq.output_ids and long:
            budget = min(budget, float(cap))
        # The largest n with prefill_cost(start, n) <= budget: a n^2 + b n - budget <= 0.
        a, b = self._attention_weight, 1.0 + seq.num_computed * self._attention_weight
        n = budget / b if a == 0 else (math.sqrt(max(b * b + 4 * a * budget, 0.0)) - b) / (2 * a)
        # The step's first chunk always makes progress, even when decodes used the budget up.
        n = max(int(n), 1 if first else 0)
        n = min(n, seq.num_tokens - seq.num_computed)
        if self.whole_prompts and n < seq.num_tokens - seq.num_computed:
            return None  # an encoder runs a prompt whole or not at all (the budget holds any one prompt)
        return ScheduledSeq(seq, n) if n > 0 else None

    def ends(self, seq: Sequence, token: int) -> bool:
        """Whether `token` ends `seq` as a stop (EOS unless ignored, or one of its stop_token_ids)."""
        return (token in self.eos_token_ids and not seq.params.ignore_eos) or token in seq.params.stop_token_ids

    def postprocess(self, item: ScheduledSeq, token: int | None) -> int | None:
        """Records one sequence's result of the step; returns its new token, if it has one. A
        sequence that finished leaves the batch here, so its blocks are free for the very next step."""
        self._owned()
        seq = item.seq
        if seq.status.finished:  # aborted while the step ran
            return None
        pooled = item.pools  # read before num_computed moves
        seq.num_computed += item.num_tokens
        seq.max_computed = max(seq.max_computed, seq.num_computed)
        self.blocks.on_computed(seq)
        if pooled:
            self.remove(seq, SequenceStatus.FINISHED_STOPPED)
            return None
        if token is None:
            return None
        seq.output_ids.append(token)
        if self.ends(seq, token):
            self.remove(seq, SequenceStatus.FINISHED_STOPPED)
        elif len(seq.output_ids) >= seq.params.max_tokens or seq.num_tokens >= self.max_model_len:
            self.remove(seq, SequenceStatus.FINISHED_LENGTH)
        return token

    def _owned(self) -> None:
        """The single-owner rule: once the step loop runs, only its coroutine changes the
        scheduler (and through it the block manager and the KV copies it queues for the next
        forward). A handler calling in would race them between forwards, so it fails here."""
        if self.owner is not None:
            try:
                current = asyncio.current_task()
            except RuntimeError:  # not on the event loop at all (another thread)
                current = None
            if current is not self.owner:
                raise RuntimeError("only the engine's step loop may change the scheduler; "
                                   "use EngineLoop.generate() and abort()")
