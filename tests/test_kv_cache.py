"""The KV cache's slot bookkeeping and slot-level prefix caching."""

import torch

from aserve.engine.kv_cache import KVCache, common_prefix_len


def _cache(slots: int = 3, prefix_caching: bool = True) -> KVCache:
    shape = (1, slots, 1, 32, 2)
    return KVCache(torch.zeros(shape), torch.zeros(shape), prefix_caching)


def test_common_prefix_len_counts_leading_equal_tokens():
    assert common_prefix_len([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2
    assert common_prefix_len([5], [1]) == 0
    assert common_prefix_len([], [1]) == 0


def test_a_prompt_takes_the_free_slot_holding_its_longest_prefix():
    kv = _cache()
    slots = [kv.take_slot([0])[0] for _ in range(3)]
    kv.free_slot(slots[0], [1, 2, 3])
    kv.free_slot(slots[1], [1, 2, 3, 4, 5, 6])
    kv.free_slot(slots[2], [7, 8])
    assert kv.take_slot([1, 2, 3, 4, 5, 9, 9]) == (slots[1], 5)
    assert kv.cached_tokens_reused == 5


def test_the_last_prompt_token_is_always_recomputed():
    kv = _cache(slots=1)
    slot, _ = kv.take_slot([0])
    kv.free_slot(slot, [1, 2, 3, 4])
    assert kv.take_slot([1, 2, 3]) == (slot, 2)


def test_without_a_match_the_least_recently_freed_slot_is_reused():
    kv = _cache()
    a, b, c = (kv.take_slot([0])[0] for _ in range(3))
    kv.free_slot(b, [1])
    kv.free_slot(a, [2])
    kv.free_slot(c, [3])
    assert kv.take_slot([9, 9]) == (b, 0)
    assert kv.take_slot([9, 9]) == (a, 0)


def test_prefix_caching_can_be_turned_off():
    kv = _cache(slots=1, prefix_caching=False)
    slot, _ = kv.take_slot([0])
    kv.free_slot(slot, [1, 2, 3, 4])
    assert kv.take_slot([1, 2, 3, 4, 5]) == (slot, 0)


def test_no_slot_is_handed_out_twice():
    kv = _cache(slots=2)
    assert {kv.take_slot([1])[0], kv.take_slot([1])[0]} == {0, 1}
    assert kv.take_slot([1]) is None and kv.num_free == 0


def test_a_prefix_held_by_a_slot_in_use_is_copied_into_the_least_recently_freed_slot():
    kv = _cache()
    busy, old, recent = (kv.take_slot([0])[0] for _ in range(3))
    kv.free_slot(old, [5])
    kv.free_slot(recent, [1, 2])
    kv.k[:, busy, :, :5] = torch.arange(1.0, 6.0).view(5, 1)
    kv.v[:, busy, :, :5] = -torch.arange(1.0, 6.0).view(5, 1)
    assert kv.take_slot([1, 2, 3, 4, 6], in_use=[(busy, [1, 2, 3, 4, 5])]) == (old, 4)
    assert kv.pending_copies == [("slot", busy, old, 4)]
    kv.apply_pending_copies()
    assert kv.k[0, old, 0, :5, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 0.0]
    assert kv.v[0, old, 0, :5, 0].tolist() == [-1.0, -2.0, -3.0, -4.0, 0.0]
    assert kv.pending_copies == []


def test_a_prefix_longer_than_the_prompt_can_use_is_not_copied_over_an_equal_free_one():
    kv = _cache()
    busy, free = kv.take_slot([0])[0], kv.take_slot([0])[0]
    kv.free_slot(free, [1, 2, 3])
    # Only 3 of the 4 prompt tokens can come from a cache: the free slot has them all.
    assert kv.take_slot([1, 2, 3, 4], in_use=[(busy, [1, 2, 3, 4, 5])]) == (free, 3)
    assert kv.pending_copies == []


def test_a_free_slot_with_an_equal_prefix_is_preferred_to_a_copy():
    kv = _cache()
    busy, free = kv.take_slot([0])[0], kv.take_slot([0])[0]
    kv.free_slot(free, [1, 2, 3])
    assert kv.take_slot([1, 2, 3, 4], in_use=[(busy, [1, 2, 3])]) == (free, 3)
    assert kv.pending_copies == []
