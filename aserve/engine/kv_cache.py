"""The KV cache: allocated once, up front, as fixed slots of max_model_len positions each.

A freed slot keeps its keys/values until it is handed out again, and remembers which
tokens they belong to. A new request whose prompt starts with those tokens (a multi-turn
chat resent with one more turn, say) takes that slot and skips prefilling the shared part:
slot-level prefix caching. Free slots are otherwise reused least recently freed first, so
the most recent conversations stay cached longest.

A prefix held by a slot still in use (a system prompt shared by concurrent requests) is
copied into the new slot instead: a copy of n positions costs a memcpy where recomputing
them costs n tokens of forward. Only computed positions can be shared, so requests with the
same system prompt that arrive in the same step still each prefill it. Copies are queued here and applied by the model runner
on its own thread, before the next forward, so no forward ever sees a half-copied slot.
Slots keep their rows contiguous, rather than sharing blocks by reference through a block
table, so that all decodes of a step attend over one strided view of the cache with no gather.
Beyond the slots, an optional PrefixPool keeps finished requests' prefixes in shared blocks
(prefix_pool.py); a prompt whose longest cached prefix is there copies it into its slot.
"""

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from aserve.engine.prefix_pool import PrefixPool
from aserve.models.llama import ModelArgs

# ("slot", source slot, destination slot, positions from 0) | ("to_pool", slot, block, first position)
# | ("from_pool", block, slot, first position)
Copy = tuple[str, int, int, int]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    # Binary search over slice equality: each comparison runs in C, so a 2,000-token
    # prompt costs ~11 list compares instead of a 2,000-step Python loop.
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(eq=False)
class KVCache:
    k: torch.Tensor  # [layers, slots, kv_heads, max_len, head_dim]
    v: torch.Tensor
    prefix_caching: bool = True
    # Free slots, least recently freed first, each with the tokens whose keys/values it holds.
    _free: OrderedDict[int, list[int]] = field(default_factory=OrderedDict)
    pool: PrefixPool | None = None
    cached_tokens_reused: int = 0  # prompt tokens not recomputed thanks to the prefix cache
    pending_copies: list[Copy] = field(default_factory=list)  # run in order before the next forward

    def __post_init__(self) -> None:
        if not self._free:
            self._free = OrderedDict((slot, []) for slot in range(self.num_slots))

    @classmethod
    def allocate(cls, args: ModelArgs, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 prefix_caching: bool = True, pool_tokens: int = 0, pool_block_size: int = 16) -> "KVCache":
        """`pool_tokens`: positions kept in a PrefixPool beyond the slots (0: none)."""
        shape = (args.num_layers, num_slots, args.num_kv_heads, max_len, args.head_dim)
        # Zeros, not empty: attention reads masked-out positions too, and 0 * NaN garbage would be NaN.
        k, v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        blocks = pool_tokens // pool_block_size if prefix_caching else 0
        return cls(k, v, prefix_caching, pool=PrefixPool.allocate(k, blocks, pool_block_size) if blocks else None)

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
        pool = self.pool.k.nbytes + self.pool.v.nbytes if self.pool is not None else 0
        return self.k.nbytes + self.v.nbytes + pool

    def take_slot(self, prompt: Sequence[int], in_use: Iterable[tuple[int, Sequence[int]]] = (),
                  reuse: bool = True, leader: tuple[int, Sequence[int]] | None = None) -> tuple[int, int] | None:
        """Returns (slot, how many leading prompt tokens that slot already holds), or None
        when every slot is in use. `in_use`: (slot, tokens it holds) of the slots in use, whose
        prefixes may be copied. `reuse=False`: compute the whole prompt (prompt logprobs need
        logits at every position). `leader`: the slot in use of an earlier choice of the same
        n>1 request, whose prompt is copied whatever the cache settings: n choices share one prefill."""
        if not self._free:
            return None
        slot, cached, source = next(iter(self._free)), 0, None
        # The last prompt token is always computed: its logits give the first new token.
        usable = len(prompt) - 1
        reuse = reuse and self.prefix_caching
        if reuse:
            for candidate, tokens in self._free.items():
                n = min(common_prefix_len(tokens, prompt), usable)
                if n > cached:
                    slot, cached = candidate, n
        for candidate, tokens in [*(in_use if reuse else ()), *([leader] if leader is not None else [])]:
            n = min(common_prefix_len(tokens, prompt), usable)
            if n > cached:
                source, cached = candidate, n
        pooled = self.pool.lookup(prompt, usable) if self.pool is not None and reuse else []
        pooled_len = len(pooled) * self.pool.block_size if pooled else 0
        if pooled_len > cached or source is not None:
            # Copy into the least recently freed slot, keeping the other cached prefixes.
            slot = next(iter(self._free))
            if pooled_len > cached:
                cached, size = pooled_len, self.pool.block_size
                self.pending_copies.extend(("from_pool", block, slot, i * size) for i, block in enumerate(pooled))
            else:
                self.pending_copies.append(("slot", source, slot, cached))
        del self._free[slot]
        self.cached_tokens_reused += cached
        return slot, cached

    def apply_pending_copies(self) -> None:
        """Called on the model thread, before a forward."""
        for kind, src, dst, n in self.pending_copies:
            if kind == "slot":
                self.k[:, dst, :, :n] = self.k[:, src, :, :n]
                self.v[:, dst, :, :n] = self.v[:, src, :, :n]
                continue
            size = self.pool.block_size
            if kind == "to_pool":
                self.pool.k[:, dst] = self.k[:, src, :, n : n + size]
                self.pool.v[:, dst] = self.v[:, src, :, n : n + size]
            else:
                self.k[:, dst, :, n : n + size] = self.pool.k[:, src]
                self.v[:, dst, :, n : n + size] = self.pool.v[:, src]
        self.pending_copies.clear()

    def free_slot(self, slot: int, cached_tokens: list[int]) -> None:
        """`cached_tokens`: the tokens whose keys/values the slot holds, from position 0."""
        self._free[slot] = cached_tokens
        if self.pool is not None:
            size = self.pool.block_size
            new_blocks = self.pool.insert(cached_tokens)
            self.pending_copies.extend(("to_pool", slot, block, i * size) for i, block in new_blocks)
