"""The contract between the model runner and the model: which tokens one forward processes.

One forward handles a flat list of T tokens from many sequences. Each token's key/value is
written at its position's place in the paged KV cache: block `token_blocks[t]`, offset
`token_offsets[t]` (see engine/block_manager.py). The first P tokens, decodes and the prefill
chunks the paged op serves (engine/model_runner.py's _is_paged), then attend through the paged
attention op, each over its own sequence's block table up to its own position. The rest are
prefill chunks, one contiguous run of prompt tokens per sequence, each attended with SDPA:
over its own keys when nothing is cached before it, else over its sequence's gathered blocks.
"""

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class PrefillChunk:
    blocks: torch.Tensor  # the sequence's blocks holding positions [0, start + length)
    start: int  # position of the chunk's first token; earlier positions are already cached
    length: int


@dataclass(slots=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] paged tokens first, then dense prefill chunks in order
    positions: torch.Tensor  # [T]
    token_blocks: torch.Tensor  # [T] the cache block each token's key/value goes to
    token_offsets: torch.Tensor  # [T] and its offset in that block
    block_tables: torch.Tensor  # int32 [R, max blocks]: block tables of the paged tokens' sequences
    query_rows: torch.Tensor  # int32 [P]: each paged token's row in block_tables
    context_lens: torch.Tensor  # int32 [P]: each paged token attends over positions [0, context_len)
    prefills: list[PrefillChunk]
    logits_indices: torch.Tensor  # [B] which of the T tokens need next-token logits
    # Each token's LoRA slot (-1: the base model); None when no token uses one (models/lora.py)
    lora_slots: torch.Tensor | None = None
    # Which of the T tokens' final hidden states are embeddings (pooling requests' last positions)
    pooling_indices: torch.Tensor | None = None

    @property
    def num_paged(self) -> int:
        return self.query_rows.numel()
