"""The model runner of an encoder-only (embedding) model: each scheduled prompt runs whole,
with no KV cache, and its pooled hidden state is its output. The scheduler hands it whole
prompts only (Scheduler.whole_prompts). Runs on the worker thread."""

from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from aserve.engine.model_runner import StepOutput
from aserve.engine.scheduler import ScheduledSeq
from aserve.models.encoder import Encoder


class EncoderRunner:
    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.device = encoder.device
        self.loras = None
        self.last_forward_s = 0.0
        # Called with (scheduled, embeddings) after each forward: tests inject faults here.
        self.fault_hook: Callable[[Seq[ScheduledSeq], list[torch.Tensor]], None] | None = None

    def run(self, scheduled: Seq[ScheduledSeq]) -> StepOutput:
        assert all(item.pools and item.seq.num_computed == 0 for item in scheduled), "encoders run whole prompts"
        with torch.inference_mode():
            vectors = self.encoder.embed([item.seq.prompt_ids for item in scheduled])
        if self.fault_hook is not None:
            self.fault_hook(scheduled, vectors)
        if not all(bool(torch.isfinite(v).all()) for v in vectors):
            raise FloatingPointError("non-finite embeddings")  # the engine then retries each prompt alone
        none = [None] * len(scheduled)
        return StepOutput(list(none), list(none), list(none), vectors)
