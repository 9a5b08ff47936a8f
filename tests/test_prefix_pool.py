"""The block pool of cached prefixes: sharing, lookup limits and LRU eviction."""

import torch

from aserve.engine.kv_cache import KVCache
from aserve.engine.prefix_pool import PrefixPool


def _pool(blocks: int, block_size: int = 2) -> PrefixPool:
    return PrefixPool.allocate(torch.zeros(1, 1, 1, 8, 2), blocks, block_size)


def test_prompts_that_share_a_prefix_share_its_blocks():
    pool = _pool(8)
    assert [i for i, _ in pool.insert([1, 2, 3, 4, 5, 6])] == [0, 1, 2]
    assert [i for i, _ in pool.insert([1, 2, 3, 4, 9, 9, 7])] == [2]  # [1, 2], [3, 4] are already there
    assert pool.num_cached == 4


def test_lookup_returns_the_longest_cached_chain_that_fits_the_limit():
    pool = _pool(8)
    blocks = [block for _, block in pool.insert([1, 2, 3, 4, 5, 6, 7, 8])]
    assert pool.lookup([1, 2, 3, 4, 5, 6, 0, 0], limit=7) == blocks[:3]
    assert pool.lookup([1, 2, 3, 4, 5, 6, 7, 8], limit=5) == blocks[:2]
    assert pool.lookup([1, 9, 3, 4], limit=4) == []


def test_a_full_pool_evicts_the_least_recently_used_block_and_never_a_parent_before_its_child():
    pool = _pool(4)
    pool.insert([1, 2, 3, 4])
    pool.insert([5, 6, 7, 8])
    pool.lookup([1, 2, 3, 4], limit=4)  # [1, 2, 3, 4] is now the more recent chain
    pool.insert([9, 9])
    assert len(pool.lookup([5, 6, 7, 8], limit=4)) == 1  # its leaf went, its first block stays
    assert len(pool.lookup([1, 2, 3, 4], limit=4)) == 2


def test_extending_the_oldest_chain_evicts_other_blocks_rather_than_giving_up():
    pool = _pool(4)
    pool.insert([1, 2, 3, 4])
    pool.insert([5, 6])
    pool.insert([7, 8])
    assert len(pool.insert([1, 2, 3, 4, 9, 9])) == 1  # [5, 6], the least recently used, makes room
    assert len(pool.lookup([1, 2, 3, 4, 9, 9], limit=6)) == 3
    assert pool.lookup([5, 6], limit=2) == []


def test_a_chain_longer_than_the_pool_keeps_its_first_blocks():
    pool = _pool(2)
    assert len(pool.insert([1, 2, 3, 4, 5, 6, 7, 8])) == 2
    assert len(pool.lookup([1, 2, 3, 4, 5, 6, 7, 8], limit=8)) == 2


def test_a_prefix_gone_from_the_slots_is_copied_back_from_the_pool():
    shape = (2, 1, 1, 16, 2)  # 2 layers, 1 slot of 16 positions
    kv = KVCache(torch.zeros(shape), torch.zeros(shape), pool=PrefixPool.allocate(torch.zeros(shape), 4, 4))
    prompt = list(range(10, 20))
    slot, _ = kv.take_slot(prompt)
    kv.k[:, slot, :, :10] = torch.arange(1.0, 11.0).view(10, 1)
    kv.v[:, slot, :, :10] = -torch.arange(1.0, 11.0).view(10, 1)
    kv.free_slot(slot, prompt)
    kv.apply_pending_copies()  # two full blocks of 4 go to the pool
    slot, cached = kv.take_slot([1, 2, 3])  # the only slot now holds another prompt
    assert cached == 0
    kv.k.zero_()
    kv.v.zero_()
    kv.free_slot(slot, [1, 2, 3])
    slot, cached = kv.take_slot(prompt + [99])
    assert cached == 8
    kv.apply_pending_copies()
    assert kv.k[1, slot, 0, :10, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.0, 0.0]
    assert kv.v[0, slot, 0, :8, 1].tolist() == [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0]
