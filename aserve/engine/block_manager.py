"""Which KV-cache blocks each sequence holds: paging and prefix caching, as bookkeeping only.

The KV cache (kv_cache.py) is one pool of fixed-size blocks of `block_size` positions. A
sequence holds a block table, the ids of the blocks that hold its positions in order, and
takes a new block only when it crosses a block boundary: memory follows tokens, and nothing
is reserved for a request's possible length.

Prefix caching names every full block by a hash of its tokens and of its parent block's hash
(so a name stands for the whole prefix up to it, as in vLLM v1 and nano-vllm), plus a salt for
anything that changes the keys/values of the same tokens (a LoRA adapter, say). A new
sequence whose leading blocks are already named takes those very blocks by reference: a
system prompt used by 32 live chats is stored once. Blocks are reference-counted; a block
nobody references goes to the free list but keeps its name, so a later prompt can still hit
it, until the block is handed out again: eviction is least recently freed first, after the
unnamed blocks. A sequence frees its blocks last to first, so a prefix's tail is evicted
before its head.

Past its last fully cached block, a prompt usually shares a few more tokens with a block that
is cached: 32 chats with one system prompt all continue its last, partly shared block with
their own questions. Each named block is also indexed under its parent's name with its tokens,
and a new sequence copies the leading positions it has in common with the best of its cached
siblings into its own next block (keys and values at a position depend only on the tokens up
to it), instead of computing them again. SGLang's radix cache shares at token granularity the
same way; vLLM shares full blocks only. Copied positions are not reported as cached (not in
`hits`, nor in a request's cached_tokens): a count that moved by one token would tell a client
whether its guess of the next token matches another user's cached prompt, one token at a
time. Whole blocks are reported, as before (OpenAI reports in steps of 128 tokens).

The hash is BLAKE2b, not Python's hash(): a crafted prompt must not be able to collide with
another user's prefix and read its cached keys/values (vLLM's CVE-2025-25183).

Copies between blocks (the partly filled last prompt block that an n>1 follower takes from
its leader: copy on write; the leading positions of a cached sibling block) are queued here
and run by the model runner on its own thread, in order, before the next forward, so no
forward ever sees a half-copied block. Everything else here runs on the event loop, in the
step coroutine.
"""

import hashlib
import itertools
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from aserve.engine.sequence import Sequence

BlockCopy = tuple[int, int, int]  # (source block, destination block, leading positions to copy)

MAX_SIBLINGS_SCANNED = 256  # cached blocks after one parent compared with a new prompt's next block


def block_hash(parent: bytes, tokens: Seq[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass(eq=False)
class BlockManager:
    num_blocks: int
    block_size: int
    prefix_caching: bool = True
    # Per block id (plain lists: a tiny model's default budget is a quarter of a million blocks).
    ref_counts: list[int] = field(init=False)
    names: list[bytes | None] = field(init=False)  # set once the block is full and named for prefix caching
    # Unreferenced blocks, handed out (evicting their name) from the front: unnamed ones, then
    # named ones least recently freed first.
    _free: OrderedDict[int, None] = field(init=False)
    _named: dict[bytes, int] = field(init=False, default_factory=dict)  # hash -> block id
    # Named blocks under their parent's name, with their tokens: partial matches past a prefix.
    _children: dict[bytes, dict[int, tuple[int, ...]]] = field(init=False, default_factory=dict)
    _parent: dict[int, bytes] = field(init=False, default_factory=dict)  # named block -> its parent's name
    pending_copies: list[BlockCopy] = field(init=False, default_factory=list)
    # vLLM's prefix-cache counters, in tokens: looked up at admission, and found cached.
    queries: int = 0
    hits: int = 0
    copied: int = 0  # prompt positions copied from cached siblings past the hits (not reported to clients)

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one position")
        self.ref_counts = [0] * self.num_blocks
        self.names = [None] * self.num_blocks
        self._free = OrderedDict.fromkeys(range(self.num_blocks))

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now: unused, or cached with nobody referencing them."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks that hold a named prefix, referenced or not."""
        return len(self._named)

    def blocks_for(self, num_positions: int) -> int:
        return -(-num_positions // self.block_size)

    # ---- admission ----

    def allocate(self, seq: Sequence, reuse: bool = True, leader: Sequence | None = None, keep_free: int = 0) -> bool:
        """Gives a waiting sequence the blocks for all its known tokens (a prompt, or a preempted
        sequence's prompt and output) and sets how many of them are already computed: the
        longest cached prefix (`reuse`), or, for an n>1 follower, its `leader`'s computed prompt
        whatever the cache settings (full blocks shared, the partly filled last one copied).
        False, changing nothing, when fewer than `keep_free` blocks would be left free."""
        size = self.block_size
        # The last known token is always computed: its logits give the next token.
        usable = seq.num_tokens - 1
        copy: tuple[int, int] | None = None  # (source block, leading positions) to copy into a new block
        reported = 0  # cached positions a client is told of: whole blocks found by name
        if leader is not None:
            shared = leader.block_table[: usable // size]
            if usable % size:
                copy = (leader.block_table[usable // size], usable % size)
            cached = usable
        elif reuse and self.prefix_caching:
            shared = self._cached_prefix(seq, usable // size)
            cached = len(shared) * size
            reported = cached
            if cached < usable and (partial := self._cached_sibling(seq, len(shared), usable - cached)):
                copy = partial
                cached += partial[1]
        else:
            shared, cached = [], 0
        needed = self.blocks_for(seq.num_tokens) - len(shared)
        reclaimed = sum(1 for b in shared if self.ref_counts[b] == 0)  # cached but free: taken back
        if self.num_free - reclaimed - needed < keep_free:
            return False
        for block in shared:
            self._ref(block)
        seq.block_table = shared + [self._take() for _ in range(needed)]
        if copy is not None:
            self.pending_copies.append((copy[0], seq.block_table[len(shared)], copy[1]))
        # Shared full blocks are named already (by the leader, or they were found by name).
        seq.num_named_blocks = len(shared) if self.prefix_caching else 0
        seq.num_computed = cached
        if not seq.num_preemptions:
            # A preempted sequence finding its own blocks again is not a prefix-cache hit.
            seq.num_cached_prompt = cached if leader is not None else reported
            if reuse and leader is None and self.prefix_caching:
                self.queries += seq.num_tokens
                self.hits += reported
                self.copied += cached - reported
        return True

    def _cached_prefix(self, seq: Sequence, max_blocks: int) -> list[int]:
        hashes = self._hashes(seq, max_blocks)
        found = []
        for h in hashes:
            if (block := self._named.get(h)) is None:
                break
            found.append(block)
        return found

    def _cached_sibling(self, seq: Sequence, index: int, limit: int) -> tuple[int, int] | None:
        """(a named block, positions) holding the longest run of `seq`'s tokens from block
        `index` on, at most `limit`, after the same prefix; None when none shares a token."""
        if not (siblings := self._children.get(self._parent_name(seq, self._hashes(seq, index), index))):
            return None
        size = self.block_size
        wanted = seq.tokens(index * size, index * size + min(limit, size))
        best: tuple[int, int] | None = None
        # The most recently named first, and a bounded number: every chat's first block is a
        # child of the same root, and this runs on the event loop at each admission.
        for block in itertools.islice(reversed(siblings), MAX_SIBLINGS_SCANNED):
            tokens = siblings[block]
            common = 0
            while common < len(wanted) and tokens[common] == wanted[common]:
                common += 1
            if common and (best is None or common > best[1]):
                best = (block, common)
                if common == len(wanted):
                    break
        return best

    @staticmethod
    def _parent_name(seq: Sequence, hashes: list[bytes], index: int) -> bytes:
        """The name block `index` of `seq` is hashed under, given the names before it: the
        previous block's, or for the first block the salt's. The salt enters hashed, so no salt
        can pose as another chain's parent digest."""
        return hashes[index - 1] if index else block_hash(seq.cache_salt.encode(), ())

    def _hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """The names of `seq`'s first `count` full blocks (computed once per sequence)."""
        size = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < count:
            i = len(hashes)
            hashes.append(block_hash(self._parent_name(seq, hashes, i), seq.tokens(i * size, (i + 1) * size)))
        return hashes[:count]

    # ---- while running ----

    def reserve(self, seq: Sequence, num_positions: int) -> bool:
        """Makes `seq`'s block table cover positions [0, num_positions); False when a needed
        block is not free (the scheduler then preempts somebody and asks again)."""
        while len(seq.block_table) * self.block_size < num_positions:
            if not self._free:
                return False
            seq.block_table.append(self._take())
        return True

    def on_computed(self, seq: Sequence) -> None:
        """Names the blocks that `seq`'s last step filled, so that later prompts can share them.
        A block whose name is already taken (two identical prompts computed at once) stays
        unnamed: one copy is enough, and it is freed as soon as its sequence ends."""
        if not self.prefix_caching:
            return
        full = seq.num_computed // self.block_size
        if full <= seq.num_named_blocks:
            return
        hashes = self._hashes(seq, full)
        size = self.block_size
        for i in range(seq.num_named_blocks, full):
            block, h = seq.block_table[i], hashes[i]
            if h not in self._named and self.names[block] is None:
                self._named[h] = block
                self.names[block] = h
                parent = self._parent_name(seq, hashes, i)
                self._children.setdefault(parent, {})[block] = tuple(seq.tokens(i * size, (i + 1) * size))
                self._parent[block] = parent
        seq.num_named_blocks = full

    def free(self, seq: Sequence) -> None:
        """Drops `seq`'s references, last block first: freed blocks keep their names (and their
        keys/values) until handed out again, and a prefix's tail goes before its head. An
        unnamed block can never be hit, so it goes to the front, to be handed out first: named
        prefixes live longer, and the pool's memory is touched only as far as traffic needs."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free[block] = None
                if self.names[block] is None:
                    self._free.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_named_blocks = 0

    def take_copies(self) -> list[BlockCopy]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    # ---- blocks ----

    def _take(self) -> int:
        block, _ = self._free.popitem(last=False)
        if (name := self.names[block]) is not None:  # evicted: its old prefix can no longer be found
            del self._named[name]
            self.names[block] = None
            parent = self._parent.pop(block)
            siblings = self._children[parent]
            del siblings[block]
            if not siblings:
                del self._children[parent]
        self.ref_counts[block] = 1
        return block

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self._free[block]
        self.ref_counts[block] += 1
