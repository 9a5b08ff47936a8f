"""Scheduling decisions, tested without a model: the runner's part is played by hand."""

import torch

from aserve.engine.kv_cache import KVCache
from aserve.engine.scheduler import Scheduler
from aserve.engine.sequence import SamplingParams, Sequence, SequenceStatus

EOS = 2


def _scheduler(slots: int = 2, budget: int = 16, max_len: int = 64,
               prefill_budget_while_decoding: int = 0) -> Scheduler:
    shape = (1, slots, 1, max_len, 4)
    kv = KVCache(torch.zeros(shape), torch.zeros(shape), prefix_caching=False)  # caching: test_kv_cache.py
    return Scheduler(kv, budget, [EOS], prefill_budget_while_decoding=prefill_budget_while_decoding)


def _seq(rid: str, prompt_len: int = 4, max_tokens: int = 10) -> Sequence:
    return Sequence(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens, temperature=0))


def _step(s: Scheduler, token: int = 5):
    scheduled = s.schedule()
    tokens = [token if item.samples else None for item in scheduled]
    return scheduled, s.postprocess(scheduled, tokens)


def test_new_request_joins_a_running_batch_at_the_next_step():
    s = _scheduler()
    a, b = _seq("a"), _seq("b")
    s.add(a)
    _step(s)
    s.add(b)
    scheduled, _ = _step(s)
    assert [(i.seq.request_id, i.num_tokens) for i in scheduled] == [("a", 1), ("b", 4)]


def test_finished_sequence_leaves_and_frees_its_slot_in_the_same_step():
    s = _scheduler()
    a, b = _seq("a", max_tokens=2), _seq("b", max_tokens=10)
    s.add(a)
    s.add(b)
    _step(s)
    _step(s)
    assert a.status == SequenceStatus.FINISHED_LENGTH and a.slot is None
    assert s.running == [b] and s.kv_cache.num_free == 1


def test_eos_finishes_with_stop():
    s = _scheduler()
    a = _seq("a")
    s.add(a)
    _step(s, token=EOS)
    assert a.finish_reason == "stop" and a.output_ids == [EOS]


def test_requests_beyond_the_slots_wait_instead_of_being_rejected():
    s = _scheduler(slots=2)
    seqs = [_seq(str(i)) for i in range(3)]
    for q in seqs:
        s.add(q)
    _step(s)
    assert [q.status for q in seqs] == [SequenceStatus.RUNNING, SequenceStatus.RUNNING, SequenceStatus.WAITING]
    s.remove(seqs[0], SequenceStatus.FINISHED_ABORTED)
    scheduled, _ = _step(s)
    assert seqs[2] in [i.seq for i in scheduled] and seqs[2].slot == 0


def test_long_prompt_is_prefilled_in_chunks_while_decodes_go_on():
    s = _scheduler(budget=8)
    a, long = _seq("a"), _seq("long", prompt_len=20)
    s.add(a)
    _step(s)
    s.add(long)
    chunks = []
    while long.in_prefill:
        scheduled, _ = _step(s)
        assert scheduled[0].seq is a and scheduled[0].num_tokens == 1  # a decodes every step
        assert sum(i.num_tokens for i in scheduled) <= 8
        chunks.append(scheduled[1].num_tokens)
    assert chunks == [7, 7, 6]
    assert long.output_ids == [5]  # sampled only once the whole prompt was in


def test_aborted_sequence_is_skipped_by_postprocess():
    s = _scheduler()
    a = _seq("a")
    s.add(a)
    scheduled = s.schedule()
    s.remove(a, SequenceStatus.FINISHED_ABORTED)  # abort arrives while the step runs
    assert s.postprocess(scheduled, [5]) == []
    assert a.output_ids == [] and s.kv_cache.num_free == 2


def test_context_limit_finishes_with_length():
    s = _scheduler(max_len=6)
    a = _seq("a", prompt_len=4, max_tokens=100)
    s.add(a)
    _step(s)
    _step(s)
    assert a.num_tokens == 6 and a.finish_reason == "length"


def test_ignore_eos_generates_past_eos_until_max_tokens():
    s = _scheduler()
    a = Sequence("a", [10, 11], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    s.add(a)
    for _ in range(3):
        _step(s, token=EOS)
    assert a.output_ids == [EOS] * 3 and a.finish_reason == "length"


def test_prefill_chunks_shrink_as_the_prompts_context_grows():
    shape = (1, 2, 1, 512, 4)
    # One token attending over 64 cached positions costs as much as its matmuls.
    s = Scheduler(KVCache(torch.zeros(shape), torch.zeros(shape)), 64, [EOS], attention_context_per_token=64)
    long = _seq("long", prompt_len=300)
    s.add(long)
    chunks = []
    while long.in_prefill:
        scheduled, _ = _step(s)
        start = long.num_computed - scheduled[0].num_tokens
        assert s.prefill_cost(start, scheduled[0].num_tokens) <= 64
        chunks.append(scheduled[0].num_tokens)
    assert sum(chunks) == 300
    assert chunks[0] > chunks[len(chunks) // 2] > chunks[-2]  # later chunks attend over more, so they are smaller


def test_a_step_always_makes_prefill_progress_even_when_its_budget_is_spent():
    shape = (1, 3, 1, 64, 4)
    # Attention so dear that one prompt token costs more than the budget the decodes leave.
    s = Scheduler(KVCache(torch.zeros(shape), torch.zeros(shape)), 3, [EOS], attention_context_per_token=1)
    a, b, c = _seq("a", prompt_len=1), _seq("b", prompt_len=1), _seq("c", prompt_len=3)
    s.add(a)
    s.add(b)
    while not b.output_ids:
        _step(s)
    s.add(c)
    for _ in range(3):
        scheduled, _ = _step(s)
        assert [(i.seq.request_id, i.num_tokens) for i in scheduled] == [("a", 1), ("b", 1), ("c", 1)]
    assert not c.in_prefill


def test_attention_cost_per_token_follows_the_model_shape():
    from aserve.models.llama import ModelArgs

    smollm = ModelArgs(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                       intermediate_size=1536, rms_norm_eps=1e-5, max_position_embeddings=8192, qkv_bias=False,
                       qk_norm=False, tie_word_embeddings=True)
    assert smollm.attention_context_per_token == 3072


def test_a_long_prompt_gets_only_the_capped_share_while_others_decode():
    s = _scheduler(slots=2, budget=16, prefill_budget_while_decoding=4)
    short = Sequence("short", [10, 11], SamplingParams(max_tokens=3, temperature=0))
    s.add(short)
    _step(s)
    s.add(_seq("long", prompt_len=60))  # more than one step's budget: a long prompt
    chunks = [[(i.seq.request_id, i.num_tokens) for i in _step(s)[0]] for _ in range(3)]
    assert chunks == [[("short", 1), ("long", 4)], [("short", 1), ("long", 4)],
                      [("long", 16)]]  # "short" has finished: nobody decodes, the whole budget again


def test_a_short_prompt_is_not_capped_while_others_decode():
    s = _scheduler(slots=2, budget=16, prefill_budget_while_decoding=4)
    a, b = _seq("a", prompt_len=4), _seq("b", prompt_len=12)
    s.add(a)
    _step(s)
    s.add(b)
    scheduled, _ = _step(s)
    assert [(i.seq.request_id, i.num_tokens) for i in scheduled] == [("a", 1), ("b", 12)]


def test_a_following_choice_waits_for_its_leaders_prompt_then_copies_it():
    shape = (1, 3, 1, 64, 4)
    s = Scheduler(KVCache(torch.zeros(shape), torch.zeros(shape)), budget := 4, [EOS])
    leader = _seq("a", prompt_len=8)
    follower = Sequence("b", list(leader.prompt_ids), leader.params, wait_for=leader)
    other = Sequence("c", [90, 91], leader.params)  # nothing in common with the leader's prompt
    s.add(leader)
    s.add(follower)
    s.add(other)
    scheduled, _ = _step(s)  # the leader takes the whole budget; the follower may not start
    assert [(i.seq.request_id, i.num_tokens) for i in scheduled] == [("a", budget)]
    scheduled, _ = _step(s)  # the leader's last chunk, again the whole budget; the follower still waits
    assert [i.seq.request_id for i in scheduled] == ["a"] and follower in s.waiting
    scheduled, _ = _step(s)
    assert [(i.seq.request_id, i.num_tokens) for i in scheduled] == [("a", 1), ("b", 1), ("c", 2)]
    assert follower.num_cached_prompt == 7  # all but the last prompt token, copied from the leader's slot


def test_stop_token_ids_finish_with_stop():
    s = _scheduler()
    seq = Sequence("a", [10, 11], SamplingParams(max_tokens=10, stop_token_ids=(7,)))
    s.add(seq)
    _step(s, token=7)
    assert seq.status == SequenceStatus.FINISHED_STOPPED
