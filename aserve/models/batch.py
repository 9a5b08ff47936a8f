"""The contract between the model runner and the model: which tokens one forward processes.

One forward handles a flat list of T tokens from many sequences. The first D tokens are
decodes (one new token per running sequence); the rest are prefill chunks, one contiguous
run of prompt tokens per sequence. Every sequence owns one KV-cache slot (a row of the
cache), so the model writes each token's key/value at (slot, position) and never moves
another sequence's cache.
"""

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class PrefillChunk:
    slot: int
    start: int  # position of the chunk's first token; earlier positions are already cached
    length: int


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] decode tokens first, then prefill chunks in order
    positions: torch.Tensor  # [T]
    token_slots: torch.Tensor  # [T] cache slot of each token
    decode_slots: torch.Tensor  # [D] cache slot of each decode token
    decode_rows: int  # decodes attend over cache rows [0, decode_rows): max decode slot + 1
    # [decode_rows, 1, 1, context_len] in the cache's dtype: 0 at the cached positions each row sees, -inf elsewhere
    decode_bias: torch.Tensor | None
    prefills: list[PrefillChunk]
    logits_indices: torch.Tensor  # [B] which of the T tokens need next-token logits

    @property
    def num_decodes(self) -> int:
        return self.decode_slots.numel()
