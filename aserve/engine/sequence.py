"""Per-request state: what was asked (SamplingParams) and how far it has got (Sequence)."""

import enum
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

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
    slot: int | None = None  # KV-cache row, held from admission until the sequence leaves
    num_computed: int = 0  # tokens whose keys/values are in the cache
    num_cached_prompt: int = 0  # prompt tokens found in the prefix cache at admission
    # A per-request generator makes a seeded request reproducible whatever else is in the batch.
    generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end) of prompt + output, as one slice."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[max(start - n, 0) : end - n]

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)
