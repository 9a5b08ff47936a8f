"""Scheduling decisions, tested without a model: the runner's part is played by hand."""

import pytest

from aserve.engine.block_manager import BlockManager
from aserve.engine.scheduler import Scheduler
from aserve.engine.sequence import SamplingParams, Sequence, SequenceStatus

EOS = 2


def _scheduler(seqs: int = 2, budget: int = 16, max_len: int = 64, prefill_budget_while_decoding: int = 0,
               blocks: int = 64, block_size: int = 4, prefix_caching: bool = False, **kwargs) -> Scheduler:
    # Prefix caching off unless a test is about it (test_block_manager.py covers its bookkeeping).
    return Scheduler(BlockManager(blocks, block_size, prefix_caching), seqs, budget, max_len, [EOS],
                     prefill_budget_while_decoding=prefill_budget_while_decoding, **kwargs)


def _seq(rid: str, prompt_len: int = 4, max_tokens: int = 10) -> Sequence:
    return Sequence(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens, temperature=0))


def _step(s: Scheduler, token: int = 5):
    scheduled = s.schedule()
    new = [(item.seq, s.postprocess(item, token if item.samples else None)) for item in scheduled]
    return scheduled, [(seq, t) for seq, t in new if t is not None]


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
    assert a.status == SequenceStatus.FINISHED_LENGTH and a.block_table == []
    assert s.running == [b] and s.blocks.num_free == 64 - len(b.block_table)


def test_eos_finishes_with_stop():
    s = _scheduler()
    a = _seq("a")
    s.add(a)
    _step(s, token=EOS)
    assert a.finish_reason == "stop" and a.output_ids == [EOS]


def test_requests_beyond_max_num_seqs_wait_instead_of_being_rejected():
    s = _scheduler(seqs=2)
    seqs = [_seq(str(i)) for i in range(3)]
    for q in seqs:
        s.add(q)
    _step(s)
    assert [q.status for q in seqs] == [SequenceStatus.RUNNING, SequenceStatus.RUNNING, SequenceStatus.WAITING]
    s.remove(seqs[0], SequenceStatus.FINISHED_ABORTED)
    scheduled, _ = _step(s)
    assert seqs[2] in [i.seq for i in scheduled] and seqs[2].status == SequenceStatus.RUNNING


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
    assert s.postprocess(scheduled[0], 5) is None
    assert a.output_ids == [] and s.blocks.num_free == 64


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
    # One token attending over 64 cached positions costs as much as its matmuls.
    s = _scheduler(budget=64, max_len=512, blocks=128, attention_context_per_token=64)
    long = _seq("long", prompt_len=300)
    s.add(long)
    chunks = []
    while not long.output_ids:
        scheduled, _ = _step(s)
        start = long.num_computed - scheduled[0].num_tokens
        assert s.prefill_cost(start, scheduled[0].num_tokens) <= 64
        chunks.append(scheduled[0].num_tokens)
    assert sum(chunks) == 300
    assert chunks[0] > chunks[len(chunks) // 2] > chunks[-2]  # later chunks attend over more, so they are smaller


def test_a_step_always_makes_prefill_progress_even_when_its_budget_is_spent():
    # Attention so dear that one prompt token costs more than the budget the decodes leave.
    s = _scheduler(seqs=3, budget=3, attention_context_per_token=1)
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
    s = _scheduler(seqs=2, budget=16, prefill_budget_while_decoding=4)
    short = Sequence("short", [10, 11], SamplingParams(max_tokens=3, temperature=0))
    s.add(short)
    _step(s)
    s.add(_seq("long", prompt_len=60))  # more than one step's budget: a long prompt
    chunks = [[(i.seq.request_id, i.num_tokens) for i in _step(s)[0]] for _ in range(3)]
    assert chunks == [[("short", 1), ("long", 4)], [("short", 1), ("long", 4)],
                      [("long", 16)]]  # "short" has finished: nobody decodes, the whole budget again


def test_a_long_prompt_stays_capped_to_its_last_chunk_while_others_decode():
    s = _scheduler(seqs=2, budget=16, prefill_budget_while_decoding=4)
    short = Sequence("short", [10, 11], SamplingParams(max_tokens=50, temperature=0))
    s.add(short)
    _step(s)
    s.add(_seq("long", prompt_len=20))  # 16 left after its first chunk: still a long prompt
    chunks = [[(i.seq.request_id, i.num_tokens) for i in _step(s)[0]] for _ in range(5)]
    assert chunks == [[("short", 1), ("long", 4)]] * 5


def test_a_short_prompt_is_not_capped_while_others_decode():
    s = _scheduler(seqs=2, budget=16, prefill_budget_while_decoding=4)
    a, b = _seq("a", prompt_len=4), _seq("b", prompt_len=12)
    s.add(a)
    _step(s)
    s.add(b)
    scheduled, _ = _step(s)
    assert [(i.seq.request_id, i.num_tokens) for i in scheduled] == [("a", 1), ("b", 12)]


def test_a_following_choice_waits_for_its_leaders_prompt_then_copies_it():
    s = _scheduler(seqs=3, budget=(budget := 4))
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
    assert follower.num_cached_prompt == 7  # all but the last prompt token, taken from the leader's blocks
    assert follower.block_table[0] == leader.block_table[0]  # its full block shared, with caching off
    assert s.blocks.pending_copies == [(leader.block_table[1], follower.block_table[1], 3)]  # the partial one copied


def test_stop_token_ids_finish_with_stop():
    s = _scheduler()
    seq = Sequence("a", [10, 11], SamplingParams(max_tokens=10, stop_token_ids=(7,)))
    s.add(seq)
    _step(s, token=7)
    assert seq.status == SequenceStatus.FINISHED_STOPPED


def _run(s: Scheduler, steps: int) -> dict[str, list[int]]:
    """Steps with distinct tokens (100, 101, ... per sequence); returns what each sequence emitted."""
    emitted: dict[str, list[int]] = {}
    for _ in range(steps):
        for item in s.schedule():
            if (token := s.postprocess(item, 100 + len(item.seq.output_ids) if item.samples else None)) is not None:
                emitted.setdefault(item.seq.request_id, []).append(token)
    return emitted


def test_a_decode_without_a_free_block_preempts_the_most_recently_admitted():
    s = _scheduler(seqs=4, blocks=4, block_size=4)
    a, b = _seq("a", prompt_len=4, max_tokens=20), _seq("b", prompt_len=4, max_tokens=20)
    s.add(a)
    s.add(b)
    _run(s, 5)  # both prompts in, then decodes up to position 7: the four blocks are all taken
    assert s.blocks.num_free == 0 and len(a.output_ids) == len(b.output_ids) == 5
    scheduled = s.schedule()  # a needs a third block for position 8
    assert [i.seq for i in scheduled] == [a]
    assert b.status == SequenceStatus.WAITING and s.waiting[0] is b and b.block_table == []
    assert b.output_ids == [100, 101, 102, 103, 104] and s.num_preemptions == 1


def test_a_preempted_sequence_resumes_without_a_lost_or_repeated_token():
    s = _scheduler(seqs=4, blocks=4, block_size=4)
    a, b = _seq("a", prompt_len=4, max_tokens=8), _seq("b", prompt_len=4, max_tokens=8)
    s.add(a)
    s.add(b)
    emitted = _run(s, 30)
    assert s.num_preemptions >= 1 and not s.has_work()
    assert emitted == {"a": list(range(100, 108)), "b": list(range(100, 108))}
    assert s.blocks.num_free == 4


def test_a_preempted_sequence_recomputes_its_prompt_and_output_in_one_chunk():
    s = _scheduler(seqs=4, blocks=4, block_size=4)
    a, b = _seq("a", prompt_len=4, max_tokens=6), _seq("b", prompt_len=4, max_tokens=20)
    s.add(a)
    s.add(b)
    _run(s, 6)  # b is preempted at the sixth step, in which a finishes and frees its blocks
    assert b.status == SequenceStatus.WAITING and a.status.finished
    scheduled = s.schedule()
    # Re-admitted with its prompt and 5 outputs known: all 9 computed at once, and it samples its sixth.
    assert [(i.seq, i.num_tokens, i.samples) for i in scheduled] == [(b, 9, True)]


def test_a_prompt_waits_when_its_blocks_are_not_free():
    s = _scheduler(seqs=4, blocks=4, block_size=4)
    a, big = _seq("a", prompt_len=8, max_tokens=2), _seq("big", prompt_len=12)
    s.add(a)
    s.add(big)
    scheduled = s.schedule()
    assert [i.seq.request_id for i in scheduled] == ["a"] and big.status == SequenceStatus.WAITING
    assert s.num_preemptions == 0  # waiting for blocks never takes them from a running sequence


def test_first_come_first_served_when_the_head_of_the_queue_does_not_fit():
    s = _scheduler(seqs=4, blocks=4, block_size=4)
    a, big, small = _seq("a", prompt_len=8), _seq("big", prompt_len=12), _seq("small", prompt_len=2)
    for q in (a, big, small):
        s.add(q)
    s.schedule()
    assert small.status == SequenceStatus.WAITING  # it would fit, but may not overtake "big"


def test_every_block_is_free_after_random_aborts_and_preemptions():
    import random

    rng = random.Random(0)
    s = _scheduler(seqs=8, blocks=24, block_size=4, budget=32, prefix_caching=True)
    seqs = []
    for step in range(400):
        if step < 300 and rng.random() < 0.3:
            # Shared starts exercise shared blocks; lengths exercise partial blocks.
            prompt = [7] * rng.choice([0, 4, 8]) + [rng.randrange(10, 50) for _ in range(rng.randrange(1, 12))]
            seqs.append(Sequence(f"r{step}", prompt, SamplingParams(max_tokens=rng.randrange(1, 30))))
            s.add(seqs[-1])
        live = [q for q in seqs if not q.status.finished]
        if live and rng.random() < 0.1:
            s.remove(rng.choice(live), SequenceStatus.FINISHED_ABORTED)
        _run(s, 1)
        holders = [b for q in s.running for b in q.block_table]
        assert all(count == holders.count(b) for b, count in enumerate(s.blocks.ref_counts)), step
        assert s.blocks.num_free + len(set(holders)) == 24, step
    assert not s.has_work() and s.num_preemptions > 0
    assert s.blocks.num_free == 24 and not any(s.blocks.ref_counts)


def test_a_preempted_stream_resuming_is_not_held_to_the_long_prompt_cap():
    s = _scheduler(seqs=2, budget=16, prefill_budget_while_decoding=4, blocks=64)
    other, resumed = _seq("other", prompt_len=2, max_tokens=50), _seq("resumed", prompt_len=30)
    s.add(other)
    _step(s)
    resumed.output_ids = [5]  # preempted after its first token: 31 tokens to recompute, > the budget
    resumed.num_preemptions = 1
    s.waiting.appendleft(resumed)
    scheduled, _ = _step(s)
    assert [(i.seq.request_id, i.num_tokens) for i in scheduled] == [("other", 1), ("resumed", 15)]


def test_removing_a_waiting_sequence_frees_what_a_failed_admission_left_it():
    s = _scheduler()
    a = _seq("a")
    s.add(a)
    total, real = s.blocks.num_free, s.blocks.allocate

    def takes_blocks_then_fails(seq, *args, **kwargs):
        real(seq, *args, **kwargs)
        raise RuntimeError("admission failed half-way")

    s.blocks.allocate = takes_blocks_then_fails
    with pytest.raises(RuntimeError):
        s.schedule()
    assert a in s.waiting and a.block_table
    s.remove(a, SequenceStatus.FINISHED_ERROR)
    assert s.blocks.num_free == total and not a.block_table
