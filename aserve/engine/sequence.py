"""Per-request state: what was asked (SamplingParams) and how far it has got (Sequence)."""

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from aserve.models.lora import LoRAAdapter


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()  # end the sequence like EOS does (vLLM extension)
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens exist
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the output so far
    repetition_penalty: float = 1.0  # vLLM/transformers: divides (or, if negative, multiplies) the
    # logits of every token in the prompt or output
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # per generated token: its logprob and this many top alternatives
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    # An embedding request: once its prompt is computed, the model's pooled hidden state is its
    # output (models/llama.py: the last position's; models/encoder.py: its own pooling), no token.
    pooling: bool = False

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows float32 into inf and NaN probabilities;
        # the distribution is an argmax anyway (vLLM uses the same cut-off).
        return self.temperature < 1e-5


class SequenceStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    # Anything after RUNNING is finished.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()

    @property
    def finished(self) -> bool:
        return self > SequenceStatus.RUNNING


FINISH_REASONS = {SequenceStatus.FINISHED_STOPPED: "stop", SequenceStatus.FINISHED_LENGTH: "length"}


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    # KV-cache blocks holding positions [0, len * block_size), from admission until the
    # sequence leaves or is preempted (block_manager.py)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # names of its full blocks, as computed so far
    num_named_blocks: int = 0  # leading blocks of block_table already named for prefix caching
    cache_salt: str = ""  # mixed into block names: requests with different salts never share KV
    lora: "LoRAAdapter | None" = None  # the loaded LoRA adapter; None: the base model
    lora_slot: int | None = None  # its slot in the model while running (engine/lora_slots.py)
    num_computed: int = 0  # tokens whose keys/values are in the cache
    max_computed: int = 0  # the most tokens ever computed: a preempted sequence recomputes up to here
    num_cached_prompt: int = 0  # prompt tokens found in the prefix cache at (first) admission
    num_preemptions: int = 0
    # A per-request generator makes a seeded request reproducible whatever else is in the batch.
    generator: torch.Generator | None = None
    guide: Any = None  # a guided.Guide that constrains sampling (response_format), advanced per token
    # Admission waits until this sequence's prompt is computed, then copies its KV: the n choices
    # of one request prefill their shared prompt once.
    wait_for: "Sequence | None" = None
    # time.monotonic() stamps, for metrics
    arrival_time: float = 0.0
    admitted_time: float | None = None
    last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        """More than one known token is not computed yet (a prompt, or a preempted sequence's
        prompt and output): the next step computes a chunk. Otherwise it decodes one token."""
        return self.num_computed < self.num_tokens - 1

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output, as one slice."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[max(start - n, 0) : end - n]

    @property
    def leader(self) -> "Sequence | None":
        """The n>1 leader whose computed prompt this sequence can take now, if any."""
        leader = self.wait_for
        if leader is not None and leader.status == SequenceStatus.RUNNING and leader.num_computed >= self.num_tokens - 1:
            return leader
        return None

    @property
    def waits(self) -> bool:
        """Its leader is still computing the prompt (or was preempted and will again)."""
        leader = self.wait_for
        return leader is not None and not leader.status.finished and self.leader is None

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)
