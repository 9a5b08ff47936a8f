"""Paged KV-cache bookkeeping (block_manager.py) and the pool's memory (kv_cache.py), without a model."""

import pytest
import torch

from aserve.engine.block_manager import MAX_SIBLINGS_SCANNED, BlockManager, block_hash
from aserve.engine.kv_cache import KVCache, parse_bytes
from aserve.engine.sequence import SamplingParams, Sequence, SequenceStatus
from aserve.models.llama import ModelArgs


def _seq(prompt: list[int], rid: str = "r", salt: str = "") -> Sequence:
    return Sequence(rid, prompt, SamplingParams(max_tokens=8), cache_salt=salt)


def _computed(bm: BlockManager, prompt: list[int], rid: str = "r", salt: str = "") -> Sequence:
    """A sequence admitted and with its whole prompt computed (its full blocks named)."""
    seq = _seq(prompt, rid, salt)
    assert bm.allocate(seq)
    seq.num_computed = len(prompt)
    bm.on_computed(seq)
    return seq


def test_a_sequence_takes_blocks_as_its_tokens_need_them():
    bm = BlockManager(8, 4)
    seq = _seq(list(range(10)))
    assert bm.allocate(seq) and len(seq.block_table) == 3 and bm.num_free == 5
    assert bm.reserve(seq, 12) and len(seq.block_table) == 3  # position 11 still fits the third block
    assert bm.reserve(seq, 13) and len(seq.block_table) == 4


def test_a_prompt_that_starts_like_a_computed_one_shares_its_full_blocks():
    bm = BlockManager(8, 4)
    first = _computed(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    second = _seq([1, 2, 3, 4, 5, 6, 7, 8, 99])
    assert bm.allocate(second)
    assert second.block_table[:2] == first.block_table[:2] and second.num_computed == 8
    assert [bm.ref_counts[b] for b in first.block_table] == [2, 2, 1]
    assert (bm.queries, bm.hits) == (19, 8)  # the first found nothing in 10 tokens; the second 8 of 9


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager(8, 4)
    first = _computed(bm, [1, 2, 3, 4, 5, 6, 7, 8])
    again = _seq([1, 2, 3, 4, 5, 6, 7, 8])
    assert bm.allocate(again) and again.num_computed == 7  # its logits give the first token
    assert bm.take_copies() == [(first.block_table[1], again.block_table[1], 3)]


def test_a_prompt_copies_what_it_shares_with_a_cached_block_past_its_full_ones():
    bm = BlockManager(8, 4)
    first = _computed(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    second = _seq([1, 2, 3, 4, 5, 6, 99, 100, 101])
    assert bm.allocate(second) and second.num_computed == 6
    assert second.block_table[0] == first.block_table[0] and second.block_table[1] != first.block_table[1]
    assert bm.take_copies() == [(first.block_table[1], second.block_table[1], 2)]  # positions 4 and 5
    assert bm.ref_counts[first.block_table[1]] == 1  # copied from, not shared
    # Reported in whole blocks only: a count moving by one token would confirm a guessed token.
    assert (bm.queries, bm.hits, bm.copied, second.num_cached_prompt) == (18, 4, 2, 4)


def test_the_longest_matching_cached_block_is_copied():
    bm = BlockManager(12, 4)
    _computed(bm, [1, 2, 3, 4, 5, 0, 0, 0, 0], rid="a")
    b = _computed(bm, [1, 2, 3, 4, 5, 6, 7, 0, 0], rid="b")
    bm.take_copies()  # b's own copy of position 4 from a
    c = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.allocate(c) and c.num_computed == 7
    assert bm.take_copies() == [(b.block_table[1], c.block_table[1], 3)]


def test_only_the_most_recent_siblings_are_compared():
    bm = BlockManager(2 * MAX_SIBLINGS_SCANNED + 8, 4)
    old = _computed(bm, [1, 7, 8, 9, 0], rid="old")  # its first block shares 3 tokens with the new prompt's
    for i in range(MAX_SIBLINGS_SCANNED):
        _computed(bm, [1, 100 + i, 0, 0, 0], rid=f"s{i}")  # newer first blocks sharing 1 token
    bm.take_copies()
    new = _seq([1, 7, 8, 5, 0])
    assert bm.allocate(new) and new.num_computed == 1  # [1] from the newest, not [1, 7, 8] from the oldest
    (source, _, count), = bm.take_copies()
    assert source != old.block_table[0] and count == 1


def test_no_partial_copy_across_cache_salts_or_after_eviction():
    bm = BlockManager(3, 4)
    bm.free(_computed(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9], salt="adapter-a"))
    other = _seq([1, 2, 3, 4, 5, 6, 0, 0, 0], salt="adapter-b")
    assert bm.allocate(other) and other.num_computed == 0 and bm.take_copies() == []
    bm.free(other)  # its three blocks were the whole pool: every named one was evicted
    again = _seq([1, 2, 3, 4, 5, 6, 0], salt="adapter-a")
    assert bm.allocate(again) and again.num_computed == 0 and bm.take_copies() == []


def test_a_block_is_named_by_its_whole_prefix_not_its_own_tokens():
    bm = BlockManager(8, 4)
    _computed(bm, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    other = _seq([9, 9, 9, 9, 5, 6, 7, 8, 0])  # same second block, another first
    assert bm.allocate(other) and other.num_computed == 0
    assert block_hash(b"", [1, 2]) != block_hash(block_hash(b"", [0]), [1, 2])


def test_a_different_cache_salt_never_shares_blocks():
    bm = BlockManager(8, 4)
    _computed(bm, [1, 2, 3, 4, 5], salt="adapter-a")
    other = _seq([1, 2, 3, 4, 5], salt="adapter-b")
    assert bm.allocate(other) and other.num_computed == 0
    same = _seq([1, 2, 3, 4, 5], salt="adapter-a")
    assert bm.allocate(same) and same.num_computed == 4


def test_freed_blocks_stay_cached_until_handed_out_again():
    bm = BlockManager(4, 4)
    first = _computed(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.free(first)
    assert bm.num_free == 4 and bm.num_cached == 2
    again = _seq([1, 2, 3, 4, 5, 6, 7, 8, 10])
    assert bm.allocate(again) and again.num_computed == 8


def test_eviction_takes_the_least_recently_freed_and_a_prefix_tail_before_its_head():
    bm = BlockManager(5, 2)
    old = _computed(bm, [1, 2, 3, 4, 0], "old")  # blocks 0 [1,2] and 1 [3,4] named, block 2 unnamed
    assert old.block_table == [0, 1, 2]
    bm.free(old)  # free order now: 2 (unnamed: no use keeping it), 3, 4, then old's named blocks last to first: 1, 0
    taker = _seq([50, 51, 52, 53, 54, 55, 56, 57])
    assert bm.allocate(taker, reuse=False) and taker.block_table == [2, 3, 4, 1]
    assert bm.names[0] is not None and bm.names[1] is None  # the head outlived the tail
    bm.free(taker)
    again = _seq([1, 2, 3, 4, 9])
    assert bm.allocate(again) and again.num_computed == 2


def test_a_shared_block_is_freed_only_by_its_last_holder():
    bm = BlockManager(8, 4)
    seqs = [_computed(bm, [1, 2, 3, 4, 5], f"r{i}") for i in range(3)]
    shared = seqs[0].block_table[0]
    assert all(s.block_table[0] == shared for s in seqs) and bm.ref_counts[shared] == 3
    bm.free(seqs[0])
    bm.free(seqs[1])
    assert bm.ref_counts[shared] == 1 and shared not in bm._free
    bm.free(seqs[2])
    assert bm.ref_counts[shared] == 0 and bm.num_free == 8


def test_admission_fails_without_change_when_blocks_do_not_suffice():
    bm = BlockManager(4, 4)
    running = _seq(list(range(12)))
    assert bm.allocate(running)
    big = _seq(list(range(100, 108)))
    assert not bm.allocate(big)
    assert big.block_table == [] and bm.num_free == 1 and bm.queries == 12
    assert not bm.allocate(_seq([1, 2, 3]), keep_free=1)  # would leave no block to grow into


def test_a_cached_free_block_counts_once_when_taken_back():
    bm = BlockManager(3, 4)
    bm.free(_computed(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9]))  # all three free, two of them named
    again = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])  # two hits + one new block: exactly three
    assert bm.allocate(again) and again.num_computed == 8 and bm.num_free == 0


def test_an_n_follower_shares_its_leaders_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(8, 4, prefix_caching=False)  # n choices share one prefill whatever the cache settings
    leader = _computed(bm, [1, 2, 3, 4, 5, 6, 7])
    leader.status = SequenceStatus.RUNNING
    follower = Sequence("f", list(leader.prompt_ids), leader.params, wait_for=leader)
    assert follower.leader is leader
    assert bm.allocate(follower, leader=follower.leader)
    assert follower.num_computed == 6 and follower.block_table[0] == leader.block_table[0]
    assert follower.block_table[1] != leader.block_table[1]  # copy on write: both will write position 7
    assert bm.take_copies() == [(leader.block_table[1], follower.block_table[1], 2)] and bm.pending_copies == []


def test_kv_cache_is_sized_from_its_memory_budget():
    args = ModelArgs(vocab_size=10, hidden_size=8, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4,
                     intermediate_size=8, rms_norm_eps=1e-5, max_position_embeddings=64, qkv_bias=False,
                     qk_norm=False, tie_word_embeddings=True)
    per_block = KVCache.bytes_per_block(args, 16, torch.float32)
    assert per_block == 2 * 2 * 1 * 16 * 4 * 4
    kv = KVCache.allocate(args, 10 * per_block + per_block // 2, 16, torch.float32, torch.device("cpu"))
    assert (kv.num_blocks, kv.num_tokens, kv.nbytes) == (10, 160, 10 * per_block)
    with pytest.raises(ValueError, match="holds no block"):
        KVCache.allocate(args, per_block - 1, 16, torch.float32, torch.device("cpu"))


def test_block_copies_copy_only_the_leading_positions():
    kv = KVCache(torch.arange(2 * 3 * 1 * 4 * 1, dtype=torch.float32).view(2, 3, 1, 4, 1),
                 torch.zeros(2, 3, 1, 4, 1))
    before = kv.k.clone()
    kv.copy_blocks([(0, 2, 3)])
    assert torch.equal(kv.k[:, 2, :, :3], before[:, 0, :, :3]) and torch.equal(kv.k[:, 2, :, 3], before[:, 2, :, 3])


@pytest.mark.parametrize("text, expected", [("2GiB", 2 * 2**30), ("3.5GiB", int(3.5 * 2**30)), ("512 MiB", 512 * 2**20),
                                            ("1GB", 10**9), ("1000", 1000), (4096, 4096)])
def test_memory_amounts_parse(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "2 GiBs", "-1GiB"])
def test_malformed_memory_amounts_are_refused(text):
    with pytest.raises(ValueError, match="not an amount of memory"):
        parse_bytes(text)


def test_an_unnamed_freed_block_is_handed_out_before_named_ones():
    bm = BlockManager(3, 2)
    named = _computed(bm, [1, 2, 3])  # block 0 named [1, 2]; block 1 holds a partial block
    other = _seq([5])
    assert bm.allocate(other) and other.block_table == [2]
    bm.free(named)
    bm.free(other)  # freed last, but unnamed
    assert bm.allocate(_seq([7, 8, 9]), reuse=False)  # takes two blocks
    assert bm.names[0] is not None  # the unnamed blocks 2 and 1 went first


def test_a_preempted_sequence_finding_its_own_blocks_is_not_counted_as_a_hit():
    bm = BlockManager(8, 4)
    seq = _computed(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.free(seq)
    seq.num_preemptions = 1
    assert bm.allocate(seq) and seq.num_computed == 8
    assert (bm.queries, bm.hits) == (9, 0)
