"""A second tier of prefix caching: prompt prefixes kept in fixed-size blocks beyond the slots.

The slots cache only as many conversations as there are slots, and a slot handed to a new
prompt loses what it held. The pool keeps the keys/values of finished requests' full blocks
of `block_size` positions, in memory of its own (`prefix_pool_tokens`). A block is named by
its tokens and its parent block, so prompts that share a system prompt, or the earlier turns
of one conversation, share those blocks: one copy, referenced by every chain through it.
A new request copies its longest cached chain into its slot before prefilling the rest.

Blocks are evicted least recently used first. A chain is touched from its last block to its
first, so a parent always outlives its children: no block is left unreachable.

Only bookkeeping happens here, on the event loop; the copies between slots and blocks are
queued on the KVCache and run on the model thread before the next forward, in order.
"""

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

BlockKey = tuple[int, tuple[int, ...]]  # (parent block's id in the pool or -1, this block's tokens)


@dataclass(eq=False)
class PrefixPool:
    k: torch.Tensor  # [layers, blocks, kv_heads, block_size, head_dim]
    v: torch.Tensor
    # Cached blocks, least recently used first: key -> block id.
    _blocks: OrderedDict[BlockKey, int] = field(default_factory=OrderedDict)
    _free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._free = list(range(self.num_blocks - 1, -1, -1))

    @classmethod
    def allocate(cls, like: torch.Tensor, num_blocks: int, block_size: int) -> "PrefixPool":
        """`like`: a slot cache [layers, slots, kv_heads, max_len, head_dim] to match."""
        layers, _, kv_heads, _, head_dim = like.shape
        shape = (layers, num_blocks, kv_heads, block_size, head_dim)
        return cls(torch.zeros(shape, dtype=like.dtype, device=like.device),
                   torch.zeros(shape, dtype=like.dtype, device=like.device))

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]

    @property
    def num_cached(self) -> int:
        return len(self._blocks)

    def lookup(self, tokens: Sequence[int], limit: int) -> list[int]:
        """The ids of the cached blocks that hold `tokens`' leading positions, at most `limit`
        positions in all; touched as used."""
        keys, blocks = self._cached_chain(tokens, limit // self.block_size)
        self._touch(keys)
        return blocks

    def insert(self, tokens: Sequence[int]) -> list[tuple[int, int]]:
        """Makes room for `tokens`' full blocks; returns (block index in `tokens`, block id) of
        those not cached yet, whose keys/values the caller must copy in."""
        size, count = self.block_size, len(tokens) // self.block_size
        keys, blocks = self._cached_chain(tokens, count)
        # The cached part goes to the recent end first, so making room evicts other blocks.
        self._touch(keys)
        parent = blocks[-1] if blocks else -1
        pinned, new = set(keys), []
        # Past the first miss every block is new: its parent was only just taken.
        for index in range(len(keys), count):
            if (block := self._take_block(pinned)) is None:
                break
            key = (parent, tuple(tokens[index * size : (index + 1) * size]))
            self._blocks[key] = block
            pinned.add(key)
            keys.append(key)
            new.append((index, block))
            parent = block
        self._touch(keys)
        return new

    def _cached_chain(self, tokens: Sequence[int], count: int) -> tuple[list[BlockKey], list[int]]:
        """Keys and ids of the cached blocks holding `tokens`' first blocks, up to `count`."""
        keys: list[BlockKey] = []
        blocks: list[int] = []
        parent = -1
        for index in range(count):
            key = (parent, tuple(tokens[index * self.block_size : (index + 1) * self.block_size]))
            if (block := self._blocks.get(key)) is None:
                break
            keys.append(key)
            blocks.append(block)
            parent = block
        return keys, blocks

    def _take_block(self, pinned: set[BlockKey]) -> int | None:
        """A free block, else the least recently used one (a leaf: its children, touched
        before it, went first); None when every cached block belongs to the chain being
        inserted, which sits at the recent end."""
        if self._free:
            return self._free.pop()
        if not self._blocks or next(iter(self._blocks)) in pinned:
            return None
        _, block = self._blocks.popitem(last=False)
        return block

    def _touch(self, keys: list[BlockKey]) -> None:
        for key in reversed(keys):  # children first: parents end up more recent
            self._blocks.move_to_end(key)
