"""The step loop: continuous batching, cancellation, seeds and fault isolation, on a tiny model."""

import asyncio
from contextlib import asynccontextmanager

import pytest
import torch

from aserve.config import load_config
from aserve.engine.engine_loop import MAX_FAULTED_STEPS, EngineError, EngineLoop, GenerationRequest
from aserve.engine.sequence import SamplingParams, Sequence, SequenceStatus
from aserve.launch import build_state

PROMPTS = [[5, 6, 7], list(range(20, 61)), [9] * 12, list(range(100, 117))]


@asynccontextmanager
async def running_engine(model_dir, max_model_len: int = 256, server: dict | None = None, **engine):
    # float32: dtype auto differs by CPU (see test_api.serve)
    config = load_config(None, {"model": {"path": str(model_dir), "max_model_len": max_model_len, "dtype": "float32"},
                                "engine": {"seed": 0, **engine}, "server": server or {}})
    state = build_state(config)
    task = asyncio.create_task(state.engine.run())
    try:
        yield state.engine
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def collect(engine: EngineLoop, rid: str, prompt: list[int], **params) -> tuple[str, str, int]:
    params.setdefault("max_tokens", 12)
    params.setdefault("temperature", 0.0)
    params.setdefault("ignore_eos", True)
    text, last = "", None
    async for last in engine.generate(GenerationRequest(rid, prompt, SamplingParams(**params))):
        text += last.text
    return text, last.finish_reason, last.completion_tokens


async def wait_until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_qwen3_dir"])
async def test_greedy_output_is_the_same_alone_and_in_a_batch(fixture, request):
    # Prefix caching off, so the batch prefills its prompts together instead of reusing them.
    model_dir = request.getfixturevalue(fixture)
    async with running_engine(model_dir, max_num_seqs=4, enable_prefix_caching=False) as engine:
        alone = [await collect(engine, f"alone{i}", p) for i, p in enumerate(PROMPTS)]
        together = await asyncio.gather(*(collect(engine, f"batch{i}", p) for i, p in enumerate(PROMPTS)))
    assert together == alone
    assert all(n == 12 and reason == "length" for _, reason, n in alone)


async def test_greedy_output_is_the_same_when_a_small_cache_forces_preemptions(tiny_llama_dir):
    # 16 blocks of 4 positions (the tiny model's keys and values take 512 bytes a position): each
    # request fits alone, the four together (121 positions) do not.
    small = {"kv_cache_memory": str(16 * 4 * 512), "block_size": 4, "max_num_seqs": 4}
    async with running_engine(tiny_llama_dir, max_num_seqs=4, enable_prefix_caching=False) as engine:
        alone = [await collect(engine, f"alone{i}", p) for i, p in enumerate(PROMPTS)]
    for caching in (False, True):
        async with running_engine(tiny_llama_dir, max_model_len=64, enable_prefix_caching=caching, **small) as engine:
            assert engine.stats()["kv_blocks_total"] == 16
            async with asyncio.timeout(60):  # a leaked block would leave a request waiting forever
                together = await asyncio.gather(*(collect(engine, f"batch{i}", p) for i, p in enumerate(PROMPTS)))
            assert engine.stats()["preemptions"] > 0
            await wait_until(lambda: engine.stats()["kv_blocks_free"] == 16)
        assert together == alone


async def test_chunked_prefill_gives_the_same_greedy_output(tiny_llama_dir):
    async with running_engine(tiny_llama_dir, max_num_batched_tokens=256) as engine:
        whole = await collect(engine, "whole", PROMPTS[1])
    async with running_engine(tiny_llama_dir, max_num_seqs=2, max_num_batched_tokens=8) as engine:
        chunked = await collect(engine, "chunked", PROMPTS[1])
    assert chunked == whole


async def test_same_seed_gives_the_same_text_and_another_seed_differs(tiny_llama_dir):
    async with running_engine(tiny_llama_dir) as engine:
        first = await collect(engine, "a", PROMPTS[0], temperature=1.0, seed=42, max_tokens=24)
        again = await collect(engine, "b", PROMPTS[0], temperature=1.0, seed=42, max_tokens=24)
        other = await collect(engine, "c", PROMPTS[0], temperature=1.0, seed=43, max_tokens=24)
    assert first == again
    assert other[0] != first[0]


async def test_a_request_joins_and_leaves_while_another_keeps_decoding(tiny_llama_dir):
    async with running_engine(tiny_llama_dir) as engine:
        long_alone = await collect(engine, "ref", PROMPTS[1], max_tokens=40)
        long_task = asyncio.create_task(collect(engine, "long", PROMPTS[1], max_tokens=40))
        await wait_until(lambda: engine.stats()["running"] == 1 and engine.steps > 45)
        short = await collect(engine, "short", PROMPTS[0], max_tokens=3)
        assert engine.stats()["running"] == 1  # the short one has left, the long one goes on
        assert not long_task.done()
        assert await long_task == long_alone
    assert short[2] == 3


async def test_closing_a_stream_aborts_its_request_and_frees_its_blocks(tiny_llama_dir):
    async with running_engine(tiny_llama_dir, max_num_seqs=2) as engine:
        total = engine.stats()["kv_blocks_total"]
        stream = engine.generate(GenerationRequest("gone", PROMPTS[0], SamplingParams(max_tokens=200, temperature=0,
                                                                                      ignore_eos=True)))
        await anext(stream)
        await anext(stream)
        assert engine.stats()["kv_blocks_free"] == total - 1  # 3 prompt tokens and a few more: one block
        await stream.aclose()
        await wait_until(lambda: engine.stats()["kv_blocks_free"] == total and engine.stats()["running"] == 0)


async def test_cancelled_consumer_aborts_its_request(tiny_llama_dir):
    async with running_engine(tiny_llama_dir, max_num_seqs=2) as engine:
        task = asyncio.create_task(collect(engine, "cancel-me", PROMPTS[0], max_tokens=500))
        await wait_until(lambda: engine.stats()["running"] == 1)
        task.cancel()
        await wait_until(lambda: engine.stats()["running"] == 0
                         and engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"])


async def test_more_requests_than_slots_wait_and_all_finish(tiny_llama_dir):
    async with running_engine(tiny_llama_dir, max_num_seqs=2) as engine:
        tasks = [asyncio.create_task(collect(engine, f"r{i}", PROMPTS[i % 4], max_tokens=6)) for i in range(6)]
        await wait_until(lambda: engine.stats()["waiting"] > 0)
        results = await asyncio.gather(*tasks)
    assert [n for _, _, n in results] == [6] * 6


class _PoisonedRunner:
    """Fails every step that includes the poisoned request: a fault in one request's data."""

    def __init__(self, runner, poison_id: str) -> None:
        self._runner, self._poison = runner, poison_id
        self.device = runner.device

    def run(self, scheduled):
        if any(item.seq.request_id == self._poison for item in scheduled):
            raise RuntimeError("injected fault")
        return self._runner.run(scheduled)


async def test_engine_error_ends_only_the_affected_request(tiny_llama_dir):
    async with running_engine(tiny_llama_dir) as engine:
        expected = [await collect(engine, f"ref{i}", p) for i, p in enumerate(PROMPTS[:2])]
        engine.runner = _PoisonedRunner(engine.runner, "bad")
        results = await asyncio.gather(
            collect(engine, "ok0", PROMPTS[0]), collect(engine, "bad", PROMPTS[2]), collect(engine, "ok1", PROMPTS[1]),
            return_exceptions=True)
        assert results[0] == expected[0] and results[2] == expected[1]
        assert isinstance(results[1], EngineError) and "injected fault" in str(results[1])
        # The loop goes on serving, and the failed request's slot is free again.
        assert await collect(engine, "after", PROMPTS[0]) == expected[0]
        assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]


def _fault_for(request_id: str, fault):
    """A fault hook that hits every step holding `request_id`, through `fault(logits, row)`."""

    def hook(scheduled, logits):
        sampling = [item.seq.request_id for item in scheduled if item.samples]
        if request_id in sampling:
            fault(logits, sampling.index(request_id))

    return hook


def _nan(logits, row):
    logits[row, 7] = float("nan")


def _inf(logits, row):
    logits[row, 7] = float("inf")


def _oom(logits, row):
    raise torch.OutOfMemoryError("CUDA out of memory (injected)")


@pytest.mark.parametrize(("fault", "message"),
                         [(_nan, "non-finite logits"), (_inf, "non-finite logits"), (_oom, "out of memory")])
async def test_a_nan_or_out_of_memory_in_one_request_fails_only_that_request(tiny_llama_dir, fault, message):
    async with running_engine(tiny_llama_dir) as engine:
        expected = [await collect(engine, f"ref{i}", p) for i, p in enumerate(PROMPTS[:2])]
        engine.runner.fault_hook = _fault_for("bad", fault)
        results = await asyncio.gather(
            collect(engine, "ok0", PROMPTS[0]), collect(engine, "bad", PROMPTS[2]), collect(engine, "ok1", PROMPTS[1]),
            return_exceptions=True)
        assert results[0] == expected[0] and results[2] == expected[1]
        assert isinstance(results[1], EngineError) and message in str(results[1])
        assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]
        engine.runner.fault_hook = None
        assert (await collect(engine, "after", PROMPTS[2], max_tokens=3))[1:] == ("length", 3)


async def test_stop_string_ends_the_request_in_the_engine(tiny_llama_dir):
    async with running_engine(tiny_llama_dir) as engine:
        full, _, _ = await collect(engine, "full", PROMPTS[3], max_tokens=30)
        stop = full[10:13]
        cut, reason, _ = await collect(engine, "cut", PROMPTS[3], max_tokens=30, stop=(stop,))
        await wait_until(lambda: engine.stats()["running"] == 0)
    assert reason == "stop"
    assert cut == full[: full.index(stop)]


def test_an_engine_that_may_run_no_sequence_is_refused_at_start(tiny_llama_dir):
    config = load_config(None, {"model": {"path": str(tiny_llama_dir)}, "engine": {"max_num_seqs": 0}})
    with pytest.raises(ValueError, match="max_num_seqs must be at least 1"):
        build_state(config)


@pytest.mark.parametrize(("setting", "message"), [
    ({"model": {"quantization": "int8"}}, "unknown quantization 'int8'"),
    ({"model": {"dtype": "float8"}}, "unknown dtype 'float8'"),
    ({"engine": {"max_num_batched_tokens": 4}}, "max_num_batched_tokens must be at least max_num_seqs"),
])
def test_bad_settings_are_refused_before_any_model_is_fetched(tmp_path, setting, message):
    overrides = {"model": {"path": str(tmp_path / "no-such-model"), **setting.get("model", {})},
                 "engine": setting.get("engine", {})}
    with pytest.raises(ValueError, match=message):
        build_state(load_config(None, overrides))


async def test_a_scheduling_fault_ends_the_requests_in_flight_and_the_loop_steps_on(tiny_llama_dir):
    async with running_engine(tiny_llama_dir) as engine:
        expected = await collect(engine, "ref", PROMPTS[0])
        tasks = [asyncio.create_task(collect(engine, f"r{i}", p, max_tokens=500)) for i, p in enumerate(PROMPTS[:2])]
        await wait_until(lambda: engine.stats()["running"] == 2)
        real, calls = engine.scheduler.schedule, []

        def schedule_failing_once():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("scheduler bug")
            return real()

        engine.scheduler.schedule = schedule_failing_once
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, EngineError) and "scheduler bug" in str(r) for r in results), results
        assert engine.healthy and engine.faults == {"step": 1} and "scheduler bug" in engine.last_fault
        assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]
        assert await collect(engine, "after", PROMPTS[0]) == expected


async def test_open_streams_end_with_an_error_if_the_loop_cannot_recover(tiny_llama_dir):
    async with running_engine(tiny_llama_dir) as engine:
        task = asyncio.create_task(collect(engine, "victim", PROMPTS[0], max_tokens=500))
        await wait_until(lambda: engine.stats()["running"] == 1)

        def broken(*args):
            raise RuntimeError("scheduler bug")

        # Scheduling fails, and so does taking the requests out: the scheduler's state is broken.
        engine.scheduler.schedule = broken
        engine.scheduler.remove = broken
        with pytest.raises(EngineError, match="stopped unexpectedly"):
            await asyncio.wait_for(task, timeout=5)
        assert not engine.healthy
        with pytest.raises(EngineError, match="not running"):
            await collect(engine, "late", PROMPTS[0])


def _failing_for(request_id: str, fn):
    """`fn` wrapped to raise when its first argument is (or belongs to) `request_id`'s sequence."""

    def wrapped(first, *args):
        seq = getattr(first, "seq", first)
        if getattr(seq, "request_id", None) == request_id:
            raise RuntimeError(f"injected fault in {fn.__name__}")
        return fn(first, *args)

    return wrapped


@pytest.mark.parametrize(("stage", "patch"), [
    ("admit", lambda engine: setattr(engine.scheduler, "add", _failing_for("bad", engine.scheduler.add))),
    ("postprocess", lambda engine: setattr(engine.scheduler, "postprocess",
                                           _failing_for("bad", engine.scheduler.postprocess))),
    ("emit", lambda engine: setattr(engine, "_emit", _failing_for("bad", engine._emit))),
])
async def test_a_fault_in_a_stage_of_one_request_fails_only_that_request(tiny_llama_dir, stage, patch):
    async with running_engine(tiny_llama_dir) as engine:
        expected = [await collect(engine, f"ref{i}", p) for i, p in enumerate(PROMPTS[:2])]
        patch(engine)
        results = await asyncio.gather(
            collect(engine, "ok0", PROMPTS[0]), collect(engine, "bad", PROMPTS[2]), collect(engine, "ok1", PROMPTS[1]),
            return_exceptions=True)
        assert results[0] == expected[0] and results[2] == expected[1]
        assert isinstance(results[1], EngineError) and "injected fault" in str(results[1])
        assert engine.faults == {stage: 1}
        await wait_until(lambda: engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"])


class _FailingObserver:
    def __getattr__(self, name):
        def fail(*args):
            raise RuntimeError(f"metrics bug in {name}")

        return fail


async def test_an_observer_that_fails_is_counted_and_fails_no_request(tiny_llama_dir):
    async with running_engine(tiny_llama_dir) as engine:
        expected = await collect(engine, "ref", PROMPTS[0])
        engine.observer = _FailingObserver()
        assert await collect(engine, "observed", PROMPTS[0]) == expected
        # on_admitted, on_step, on_token each step and on_finished: all counted, none fatal
        assert engine.faults["observer"] >= 12 and set(engine.faults) == {"observer"}


async def test_a_seeded_request_gives_the_same_text_alone_and_in_a_busy_mixed_batch(tiny_llama_dir):
    seeded = dict(temperature=1.0, top_p=0.9, seed=1234, max_tokens=40)
    async with running_engine(tiny_llama_dir, enable_prefix_caching=False) as engine:
        alone = await collect(engine, "alone", PROMPTS[1], **seeded)
        # A neighbour whose logits turn NaN: the batched step samples (drawing from every
        # generator) and then fails, and the step is rerun one sequence at a time.
        engine.runner.fault_hook = _fault_for("poisoned", _nan)
        target = asyncio.create_task(collect(engine, "seeded", PROMPTS[1], **seeded))
        others = [asyncio.create_task(collect(engine, f"o{i}", p, temperature=1.0, max_tokens=5 + 7 * i))
                  for i, p in enumerate((PROMPTS[0], PROMPTS[2], PROMPTS[3]))]
        await wait_until(lambda: engine.stats()["steps"] >= 8)  # then more join, mid-way
        late = [asyncio.create_task(collect(engine, "late", PROMPTS[2], temperature=0.7, top_p=0.9, seed=9)),
                asyncio.create_task(collect(engine, "poisoned", PROMPTS[3], temperature=1.0))]
        busy = await target
        results = await asyncio.gather(*others, *late, return_exceptions=True)
    assert isinstance(results[-1], EngineError) and all(not isinstance(r, Exception) for r in results[:-1])
    assert busy == alone


async def test_the_engine_refuses_sequences_past_its_bound_as_the_http_layer_does(tiny_llama_dir):
    async with running_engine(tiny_llama_dir, max_num_seqs=1, server={"max_waiting_requests": 1}) as engine:
        assert engine.max_sequences == 2
        held = [engine.generate(GenerationRequest(f"r{i}", PROMPTS[0], SamplingParams(max_tokens=400, ignore_eos=True)))
                for i in range(2)]
        await asyncio.gather(*(anext(g) for g in held))  # both in the engine, one running, one waiting
        with pytest.raises(EngineError, match="its limit") as refused:
            await collect(engine, "third", PROMPTS[0])
        assert refused.value.code == "server_busy"
        for g in held:
            await g.aclose()
        assert (await collect(engine, "after", PROMPTS[0], max_tokens=2))[1:] == ("length", 2)


async def test_only_the_step_loop_may_change_the_scheduler(tiny_llama_dir):
    async with running_engine(tiny_llama_dir) as engine:
        outputs = engine.generate(GenerationRequest("r", PROMPTS[0], SamplingParams(max_tokens=400, ignore_eos=True)))
        await anext(outputs)
        [seq] = engine.scheduler.running
        with pytest.raises(RuntimeError, match="only the engine's step loop"):
            engine.scheduler.remove(seq, SequenceStatus.FINISHED_ABORTED)  # as a handler might
        assert engine.scheduler.running == [seq]
        await outputs.aclose()  # the way to end a request from outside: abort, done by the loop
        await wait_until(lambda: not engine.scheduler.running)


async def test_a_token_that_finishes_a_request_is_delivered_to_a_full_buffer(tiny_llama_dir):
    async with running_engine(tiny_llama_dir, max_buffered_tokens=2) as engine:
        seq = Sequence("done", list(PROMPTS[0]), SamplingParams(max_tokens=3), status=SequenceStatus.FINISHED_LENGTH,
                       output_ids=[1, 2, 3])
        queue = engine._streams["done"] = asyncio.Queue()
        queue.put_nowait("earlier token")
        queue.put_nowait("earlier token")
        engine._emit(seq, 3, None)  # the buffer is full, but this token finishes the request
        last = queue._queue[-1]
        assert last.error is None and last.finish_reason == "length"


async def test_prefix_cache_reuses_a_finished_requests_tokens_without_changing_the_output(tiny_llama_dir):
    first_turn = PROMPTS[1]
    second_turn = PROMPTS[1] + [30, 31, 32] + PROMPTS[0]  # the same history resent with more
    async with running_engine(tiny_llama_dir, max_num_seqs=2, enable_prefix_caching=False) as engine:
        await collect(engine, "t1", first_turn)
        expected = await collect(engine, "t2", second_turn)
        assert engine.stats()["prefix_cache_hits"] == 0
    async with running_engine(tiny_llama_dir, max_num_seqs=2) as engine:
        await collect(engine, "t1", first_turn)
        cached = await collect(engine, "t2", second_turn)
        # Two whole 16-token blocks; the 9 tokens t2's third block shares with t1's (which went
        # on with t1's output) are copied from it, and not reported.
        assert engine.stats()["prefix_cache_hits"] == 32 and engine.scheduler.blocks.copied == 9
    assert cached == expected


async def test_a_prefix_held_by_a_running_request_is_shared_without_changing_the_output(tiny_llama_dir):
    system = PROMPTS[1]
    first, second = system + [7, 8, 9], system + [70, 71]
    async with running_engine(tiny_llama_dir, max_num_seqs=2, enable_prefix_caching=False) as engine:
        expected = await collect(engine, "b", second)
    async with running_engine(tiny_llama_dir, max_num_seqs=2) as engine:
        running = asyncio.create_task(collect(engine, "a", first, max_tokens=200))
        # "a" is decoding, its 44-token prompt and 4 tokens more computed: 3 full blocks named
        await wait_until(lambda: engine.stats()["steps"] >= 5)
        copied = await collect(engine, "b", second)
        assert not running.done()  # "b" was admitted while "a" still held the prefix
        # The system prompt's two full blocks, and its last 9 tokens copied from a's third block.
        assert engine.stats()["prefix_cache_hits"] == 32 and engine.scheduler.blocks.copied == 9
        running.cancel()
    assert copied == expected


async def test_a_finished_requests_blocks_stay_cached_while_others_run(tiny_llama_dir):
    history, resent = PROMPTS[1], PROMPTS[1] + [30, 31]  # 41 tokens: two full blocks of 16
    async with running_engine(tiny_llama_dir, max_num_seqs=1, enable_prefix_caching=False) as engine:
        expected = await collect(engine, "cold", resent)
    async with running_engine(tiny_llama_dir, max_num_seqs=1) as engine:
        await collect(engine, "t1", history)
        await collect(engine, "other", PROMPTS[2])
        again = await collect(engine, "t2", resent)
        assert engine.stats()["prefix_cache_hits"] == 32  # two full blocks
        assert engine.scheduler.blocks.copied == 9  # and t1's third block's first 9 tokens
        # t1's 52 computed tokens fill 3 blocks, "other"'s 23 fill 1, t2's 54 add its third block.
        assert engine.stats()["kv_blocks_cached"] == 5
    assert again == expected


def test_the_model_thread_gets_the_configured_torch_threads_and_the_caller_keeps_its_own(tiny_llama_dir):
    before = torch.get_num_threads()
    config = load_config(None, {"model": {"path": str(tiny_llama_dir), "max_model_len": 64},
                                "engine": {"num_threads": before + 1}})
    engine = build_state(config).engine
    assert engine.model_thread.submit(torch.get_num_threads).result() == before + 1
    assert torch.get_num_threads() == before


async def test_a_client_that_stops_reading_is_dropped_and_its_slot_freed(tiny_llama_dir):
    async with running_engine(tiny_llama_dir, max_buffered_tokens=8) as engine:
        outputs = engine.generate(GenerationRequest("slow", PROMPTS[0], SamplingParams(max_tokens=200, ignore_eos=True)))
        await anext(outputs)  # the request runs; then its reader stalls
        await wait_until(lambda: engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"])
        assert engine.stats()["running"] == 0
        with pytest.raises(EngineError, match="did not read its stream"):
            async for _ in outputs:
                pass
        assert (await collect(engine, "next", PROMPTS[1], max_tokens=3))[1:] == ("length", 3)  # it serves on


async def test_a_fault_on_every_step_ends_the_loop_so_the_replica_is_restarted(tiny_llama_dir):
    async with running_engine(tiny_llama_dir) as engine:
        def broken():
            raise RuntimeError("scheduler bug, every time")

        engine.scheduler.schedule = broken
        for i in range(MAX_FAULTED_STEPS):  # each fails; the last one's step ends the loop
            with pytest.raises(EngineError):
                await collect(engine, f"r{i}", PROMPTS[0])
        await wait_until(lambda: not engine.healthy)
        assert engine.faults == {"step": MAX_FAULTED_STEPS}
        with pytest.raises(EngineError, match="not running"):
            await collect(engine, "late", PROMPTS[0])


async def test_a_request_id_is_refused_until_its_aborted_namesake_has_left(tiny_llama_dir):
    async with running_engine(tiny_llama_dir) as engine:
        outputs = engine.generate(GenerationRequest("same", PROMPTS[0], SamplingParams(max_tokens=400, ignore_eos=True)))
        await anext(outputs)
        await outputs.aclose()  # aborted: it leaves the batch at the next step
        with pytest.raises(EngineError, match="already running"):
            await collect(engine, "same", PROMPTS[0])
        await wait_until(lambda: not engine.scheduler.running)
        assert (await collect(engine, "same", PROMPTS[0], max_tokens=2))[1:] == ("length", 2)
