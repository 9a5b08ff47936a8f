"""The KV cache: allocated once, up front, as fixed slots of max_model_len positions each."""

import heapq
from dataclasses import dataclass, field

import torch

from aserve.models.llama import ModelArgs


@dataclass(eq=False)
class KVCache:
    k: torch.Tensor  # [layers, slots, kv_heads, max_len, head_dim]
    v: torch.Tensor
    _free: list[int] = field(default_factory=list)

    @classmethod
    def allocate(cls, args: ModelArgs, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device) -> "KVCache":
        shape = (args.num_layers, num_slots, args.num_kv_heads, max_len, args.head_dim)
        # Zeros, not empty: attention reads masked-out positions too, and 0 * NaN garbage would be NaN.
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   list(range(num_slots)))

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def take_slot(self) -> int | None:
        # Lowest slot first keeps the decode batch's row range [0, max slot] tight.
        return heapq.heappop(self._free) if self._free else None

    def free_slot(self, slot: int) -> None:
        heapq.heappush(self._free, slot)
