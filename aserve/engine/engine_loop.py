"""The step loop: one coroutine that owns the scheduler, the model runner and the KV cache.

Handlers call `generate()`, which puts the request on an asyncio queue and returns an async
generator of text deltas. The loop admits queued requests at each step boundary, runs one
batched forward on a single worker thread (so the event loop keeps serving meanwhile), and
hands each new token to its request's own queue with put_nowait: it never awaits a client.

No single fault kills the loop. A forward that fails is rerun one sequence at a time, and only
the sequences that fail alone end with an error. A fault in a stage that concerns one sequence
(admitting it, recording its token, advancing its grammar, handing the token over) ends that
sequence. An observer (metrics) that fails is counted and ignored. A fault that no single request
can be blamed for (scheduling) ends every request in flight and the loop steps on. Each is
counted by stage (`faults`, in /health and /metrics). The loop ends only when it cannot recover
(the scheduler's own state broken) or such faults come MAX_FAULTED_STEPS steps in a row: then
every open stream hears it, and /health and /health/live turn 503, so the replica is restarted.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import tokenizers
import torch

from aserve.engine.detokenizer import IncrementalDetokenizer
from aserve.engine.model_runner import ModelRunner, StepOutput
from aserve.engine.sampler import TokenLogprobs
from aserve.engine.scheduler import ScheduledSeq, Scheduler
from aserve.engine.sequence import SamplingParams, Sequence, SequenceStatus

log = logging.getLogger("aserve.engine")

# Steps in a row that may fault outside the model (each failing every request in flight) before
# the loop gives up: one is a bug met once; a fault on every step is a broken engine.
MAX_FAULTED_STEPS = 3


class EngineError(Exception):
    """The engine failed this request; other requests go on."""

    def __init__(self, message: str, code: str = "engine_error") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    guide: Any = None  # a fresh guided.Guide when the output is constrained (response_format)
    # Another request with the same prompt (an earlier choice of the same n>1 request) whose KV
    # this one copies once it is computed, instead of prefilling the prompt again.
    follows: str | None = None
    # Mixed into the prefix cache's block names: requests with different salts never share
    # keys/values (what changes the KV of the same tokens, or tenants that must not share).
    cache_salt: str = ""
    lora: Any = None  # the loaded LoRA adapter (models.lora.LoRAAdapter); None: the base model
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class RequestOutput:
    text: str  # new text since the previous output
    finish_reason: str | None  # "stop" / "length" on the last output, else None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose keys/values were found in the prefix cache
    # When asked for: one entry per shown token behind `text`, and, on the first output only,
    # one per prompt token (None for the first, which nothing predicts).
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    stop_sequence: str | None = None  # on the last output: the stop string that ended it, if one did
    embedding: torch.Tensor | None = None  # a pooling request's (float32 [hidden], not normalized)


@dataclass(frozen=True, slots=True)
class _Event:
    token: int | None = None
    is_text: bool = True  # False for a stop token (EOS, stop_token_ids): counted, never shown
    finish_reason: str | None = None
    error: str | None = None
    error_code: str = "engine_error"
    cached_tokens: int = 0
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None  # for some prompt tokens: one prefill chunk's
    embedding: torch.Tensor | None = None  # a pooling request's result (its only event)


class EngineObserver(Protocol):
    """What the engine reports as it goes (metrics.Metrics), called on the event-loop thread."""

    def on_admitted(self, queue_seconds: float, prompt_tokens: int) -> None: ...
    def on_step(self, seconds: float, batch_size: int) -> None: ...
    def on_token(self, first: bool, seconds: float) -> None: ...
    def on_finished(self, finish_reason: str, e2e_seconds: float) -> None: ...


class EngineLoop:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, tokenizer: tokenizers.Tokenizer,
                 model_thread: ThreadPoolExecutor | None = None, observer: EngineObserver | None = None,
                 max_buffered_tokens: int = 0, max_sequences: int = 0) -> None:
        """`model_thread`: the one-worker executor that runs every forward; pass the one the
        model was loaded on (launch.py says why). Default: a new one. `max_sequences`: sequences
        the engine holds, running and waiting, before generate() refuses more (0: no bound)."""
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self._incoming: asyncio.Queue[GenerationRequest] = asyncio.Queue()
        self._streams: dict[str, asyncio.Queue[_Event]] = {}
        self._seqs: dict[str, Sequence] = {}
        self._aborted: set[str] = set()
        # One fixed thread runs every forward: model state (and CUDA graphs) may be thread-bound.
        self.model_thread = model_thread or ThreadPoolExecutor(max_workers=1, thread_name_prefix="aserve-model")
        self.observer = observer
        self.max_buffered_tokens = max_buffered_tokens  # per request, undelivered; 0: no bound
        self.max_sequences = max_sequences
        self.steps = 0
        self.healthy = True
        self.faults: dict[str, int] = {}  # stage -> faults the loop survived there
        self.last_fault: str | None = None
        self._faulted_steps = 0  # in a row, with no step run in between

    # ---- the API side (event-loop thread, called from handlers) ----

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        rid = request.request_id
        if not self.healthy:
            raise EngineError("the engine is not running")
        if rid in self._streams or rid in self._seqs:  # an aborted one leaves at the next step
            raise EngineError(f"request id {rid!r} is already running")
        if self.max_sequences and len(self._streams) >= self.max_sequences:
            # The HTTP layer refuses first (serving.py); this bound holds for embedded users too.
            raise EngineError(f"the engine holds {len(self._streams)} sequences, its limit: try again later",
                              "server_busy")
        queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._streams[rid] = queue
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_ids, request.params.stop)
        self._incoming.put_nowait(request)
        prompt_tokens, completion_tokens, cached_tokens, done = len(request.prompt_ids), 0, 0, False
        prompt_logprobs: list[TokenLogprobs | None] | None = None
        if request.params.prompt_logprobs is not None:
            prompt_logprobs = [None]
        try:
            while not done:
                # Drain everything already queued: a client that fell behind gets one
                # coalesced delta instead of one write per token.
                events = [await queue.get()]
                while not queue.empty():
                    events.append(queue.get_nowait())
                text, finish_reason, logprobs, embedding = "", None, [], None
                for event in events:
                    if event.error:
                        raise EngineError(event.error, event.error_code)
                    if event.prompt_logprobs is not None:
                        prompt_logprobs.extend(event.prompt_logprobs)
                        continue
                    if event.embedding is not None:  # a pooling request's one result
                        embedding, finish_reason, cached_tokens = event.embedding, "stop", event.cached_tokens
                        break
                    # One logprobs entry per counted completion token, as vLLM gives them: the
                    # stop token (EOS, stop_token_ids) and the token that completed a stop
                    # string have theirs too, though their text is not shown.
                    completion_tokens += 1
                    cached_tokens = event.cached_tokens
                    if event.logprobs is not None:
                        logprobs.append(event.logprobs)
                    if event.is_text:
                        out = detok.push((event.token,))
                        text += out.text
                        if out.stopped:
                            # The engine cannot see stop strings: tell it to let go. Tokens
                            # drained after the stop are neither shown nor counted.
                            finish_reason = "stop"
                            self.abort(rid)
                            break
                    if event.finish_reason:
                        finish_reason = event.finish_reason
                        text += detok.finish()
                done = finish_reason is not None
                if done:
                    self._observe("on_finished", finish_reason, time.monotonic() - request.arrival_time)
                if text or done or logprobs:
                    yield RequestOutput(text, finish_reason, prompt_tokens, completion_tokens, cached_tokens,
                                        logprobs, prompt_logprobs, detok.matched_stop if done else None, embedding)
                    prompt_logprobs = None
        finally:
            # Reached without a finish when the client went away (CancelledError in a
            # handler, or the generator closed): free its KV blocks.
            if not done:
                self.abort(rid)
            self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        """Idempotent; the sequence leaves the batch at the next step boundary. A request
        not admitted yet is skipped at admission, since its stream is gone."""
        self._streams.pop(request_id, None)
        if request_id in self._seqs:
            self._aborted.add(request_id)

    def close(self, reason: str, code: str = "engine_unavailable") -> None:
        """Ends every open stream with an error (shutdown); the loop task is cancelled after."""
        self.healthy = False
        for queue in self._streams.values():
            queue.put_nowait(_Event(error=reason, error_code=code))

    def stats(self) -> dict[str, int | float]:
        blocks = self.scheduler.blocks
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + self._incoming.qsize(),
            "max_num_seqs": self.scheduler.max_num_seqs,
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_free": blocks.num_free,
            "kv_blocks_cached": blocks.num_cached,
            "kv_block_size": blocks.block_size,
            "prefix_cache_queries": blocks.queries,
            "prefix_cache_hits": blocks.hits,
            "prefix_cache_hit_rate": round(blocks.hits / blocks.queries, 4) if blocks.queries else 0.0,
            "preemptions": self.scheduler.num_preemptions,
            "steps": self.steps,
            "engine_faults": sum(self.faults.values()),
        }

    def lora_requests(self) -> tuple[dict[str, int], dict[str, int]] | None:
        """Running and waiting requests per LoRA adapter name; None without LoRA."""
        if self.scheduler.loras is None:
            return None
        counts: tuple[dict[str, int], dict[str, int]] = ({}, {})
        for table, seqs in zip(counts, (self.scheduler.running, self.scheduler.waiting)):
            for seq in seqs:
                if seq.lora is not None:
                    table[seq.lora.name] = table.get(seq.lora.name, 0) + 1
        return counts

    # ---- the step loop ----

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.scheduler.owner = asyncio.current_task()  # the single-owner rule, checked by the scheduler
        try:
            while True:
                if not self.scheduler.has_work():
                    self._admit(await self._incoming.get())
                try:
                    ran = await self._step(loop)
                except Exception as exc:
                    # Nothing says which request caused it (the scheduler's own decisions): end
                    # every request in flight, and step on with a clean scheduler.
                    self._fault("step", exc)
                    self._fail_all(f"engine error: {type(exc).__name__}: {exc}")
                    self._faulted_steps += 1
                    if self._faulted_steps >= MAX_FAULTED_STEPS:
                        # It is not passing: a replica that fails every request must leave its
                        # router's rotation and be restarted, which only a dead loop gets it.
                        raise RuntimeError(f"{self._faulted_steps} steps in a row faulted; the last: "
                                           f"{type(exc).__name__}: {exc}") from exc
                else:
                    if ran:
                        self._faulted_steps = 0
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.exception("engine loop died")
            self.close("the engine stopped unexpectedly")  # no stream may wait forever
            raise
        finally:
            self.model_thread.shutdown(wait=False, cancel_futures=True)

    async def _step(self, loop: asyncio.AbstractEventLoop) -> bool:
        """One step; False when nothing was scheduled."""
        while not self._incoming.empty():
            self._admit(self._incoming.get_nowait())
        self._drop_aborted()
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if self.scheduler.loading_adapters():  # nothing else to run: fill the slots at once
                await loop.run_in_executor(self.model_thread, self.runner.load_adapters)
            await asyncio.sleep(0)
            return False
        self._observe_admissions(scheduled)
        started = time.monotonic()
        draws = _Draws.save(scheduled, getattr(self.runner, "generator", None))
        try:
            out = await loop.run_in_executor(self.model_thread, self.runner.run, scheduled)
        except Exception:
            log.exception("batched step failed; retrying its %d sequences one by one", len(scheduled))
            out = await self._run_isolated(scheduled, draws)
        self.steps += 1
        self._observe("on_step", time.monotonic() - started, len(scheduled))
        self._drop_aborted()
        for item, prompt_logprobs in zip(scheduled, out.prompt_logprobs):
            if prompt_logprobs and (queue := self._streams.get(item.seq.request_id)) is not None:
                queue.put_nowait(_Event(prompt_logprobs=prompt_logprobs))
        for item, token, logprobs in zip(scheduled, out.tokens, out.logprobs):
            self._for_one(item.seq, "postprocess", self._record, item, token, logprobs)
        for item, vector in zip(scheduled, out.embeddings or ()):
            if vector is not None and item.seq.status.finished:
                self._seqs.pop(item.seq.request_id, None)
                if (queue := self._streams.get(item.seq.request_id)) is not None:
                    queue.put_nowait(_Event(finish_reason="stop", cached_tokens=item.seq.num_cached_prompt,
                                            embedding=vector))
        return True

    def _record(self, item: ScheduledSeq, token: int | None, logprobs: TokenLogprobs | None) -> None:
        """One sequence's result of the step: its token recorded, its grammar advanced, the
        token handed to its stream."""
        seq = item.seq
        if (token := self.scheduler.postprocess(item, token)) is None:
            return
        if seq.guide is not None:
            self._for_one(seq, "grammar", seq.guide.accept, token)
            if seq.status == SequenceStatus.FINISHED_ERROR:
                return
        self._for_one(seq, "emit", self._emit, seq, token, logprobs)

    def _for_one(self, seq: Sequence, stage: str, fn: Callable[..., None], *args: Any) -> None:
        """Runs a stage that concerns `seq` alone: a fault there ends `seq` only."""
        try:
            fn(*args)
        except Exception as exc:
            self._fault(stage, exc, seq.request_id)
            self._fail(seq, f"engine error ({stage}): {type(exc).__name__}: {exc}")

    def _observe(self, method: str, *args: Any) -> None:
        """Reports to the observer; metrics that fail are counted, never a request's problem."""
        if self.observer is None:
            return
        try:
            getattr(self.observer, method)(*args)
        except Exception as exc:
            self._fault("observer", exc)

    def _fault(self, stage: str, exc: Exception, request_id: str | None = None) -> None:
        count = self.faults[stage] = self.faults.get(stage, 0) + 1
        self.last_fault = f"{stage}: {type(exc).__name__}: {exc}"
        who = f" (request {request_id})" if request_id else ""
        if count == 1:  # the first of a kind with its traceback, later ones a line (metrics: counted only)
            log.error("engine fault in %s%s; the loop goes on", stage, who, exc_info=exc)
        else:
            log.log(logging.DEBUG if stage == "observer" else logging.WARNING, "engine fault in %s%s: %s",
                    stage, who, exc)

    def _fail_all(self, message: str) -> None:
        """Ends every admitted request with an error and empties the scheduler. If that fails
        too, or leaves anything behind, the scheduler's state is broken: the loop ends (run)."""
        for seq in list(self._seqs.values()):
            self._fail(seq, message)
        if self.scheduler.has_work():
            raise RuntimeError("the scheduler kept sequences after every request was failed")

    def _admit(self, request: GenerationRequest) -> None:
        rid = request.request_id
        if (queue := self._streams.get(rid)) is None:
            return
        try:
            self._add(request, queue)
        except Exception as exc:  # this request's fields or state: it alone fails
            self._fault("admit", exc, rid)
            message = f"engine error (admit): {type(exc).__name__}: {exc}"
            if (seq := self._seqs.get(rid)) is not None:
                self._fail(seq, message)  # added before the fault: taken out again
            else:
                queue.put_nowait(_Event(error=message))

    def _add(self, request: GenerationRequest, queue: "asyncio.Queue[_Event]") -> None:
        rid = request.request_id
        generator = None
        if request.params.seed is not None:
            try:
                generator = torch.Generator(self.runner.device).manual_seed(request.params.seed)
            except (RuntimeError, ValueError, OverflowError) as exc:  # no request field may stop the loop
                queue.put_nowait(_Event(error=f"invalid seed: {exc}", error_code="invalid_seed"))
                return
        seq = Sequence(rid, list(request.prompt_ids), request.params, generator=generator, guide=request.guide,
                       wait_for=self._seqs.get(request.follows) if request.follows else None,
                       cache_salt=request.cache_salt, lora=request.lora, arrival_time=request.arrival_time)
        self._seqs[rid] = seq
        self.scheduler.add(seq)

    def _observe_admissions(self, scheduled: list[ScheduledSeq]) -> None:
        now = time.monotonic()
        for item in scheduled:
            seq = item.seq
            if seq.admitted_time is None:
                seq.admitted_time = now
                self._observe("on_admitted", now - seq.arrival_time, len(seq.prompt_ids) - seq.num_cached_prompt)

    def _drop_aborted(self) -> None:
        for rid in self._aborted:
            if (seq := self._seqs.pop(rid, None)) is not None:
                self.scheduler.remove(seq, SequenceStatus.FINISHED_ABORTED)
        self._aborted.clear()

    async def _run_isolated(self, scheduled: list[ScheduledSeq], draws: "_Draws") -> StepOutput:
        """After a batched step failed, find the sequences that cause it: each runs alone,
        and only the ones that fail alone are ended with an error. Random draws start again
        from where the failed step found them, so a seeded request's text does not depend on
        whether a neighbour failed."""
        loop = asyncio.get_running_loop()
        out = StepOutput([], [], [])
        draws.restore_shared()
        for item in scheduled:
            draws.restore(item.seq)
            try:
                out += await loop.run_in_executor(self.model_thread, self.runner.run, [item])
            except Exception as exc:
                self._fault("forward", exc, item.seq.request_id)
                self._fail(item.seq, f"engine error: {type(exc).__name__}: {exc}")
                out += StepOutput([None], [None], [None])
        return out

    def _fail(self, seq: Sequence, message: str, code: str = "engine_error") -> None:
        self.scheduler.remove(seq, SequenceStatus.FINISHED_ERROR)
        self._seqs.pop(seq.request_id, None)
        if (queue := self._streams.get(seq.request_id)) is not None:
            queue.put_nowait(_Event(error=message, error_code=code))

    def _emit(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        finish_reason = seq.finish_reason
        now = time.monotonic()
        first = seq.last_token_time is None
        self._observe("on_token", first, now - (seq.arrival_time if first else seq.last_token_time))
        seq.last_token_time = now
        if seq.status.finished:
            self._seqs.pop(seq.request_id, None)
        if (queue := self._streams.get(seq.request_id)) is not None:
            # A token that finishes its request is always delivered: the request holds nothing
            # more, and a slow client that read everything else gets its whole answer.
            if self.max_buffered_tokens and queue.qsize() >= self.max_buffered_tokens and not seq.status.finished:
                # Its client stopped reading (a stalled or very slow connection): never wait for
                # it, and never let it hold KV blocks and memory without bound.
                self._fail(seq, f"the client did not read its stream: {queue.qsize()} tokens were waiting",
                           "client_too_slow")
                return
            is_text = not (finish_reason == "stop" and self.scheduler.ends(seq, token))
            queue.put_nowait(_Event(token, is_text, finish_reason, cached_tokens=seq.num_cached_prompt,
                                    logprobs=logprobs))


@dataclass(slots=True)
class _Draws:
    """The random generators' states before a step: the shared one and each seeded sequence's."""

    shared: torch.Generator | None
    shared_state: torch.Tensor | None
    seeded: dict[int, torch.Tensor]  # id(sequence) -> its generator's state

    @classmethod
    def save(cls, scheduled: list[ScheduledSeq], shared: torch.Generator | None) -> "_Draws":
        seeded = {id(item.seq): item.seq.generator.get_state() for item in scheduled
                  if item.samples and item.seq.generator is not None}
        return cls(shared, shared.get_state() if shared is not None else None, seeded)

    def restore_shared(self) -> None:
        if self.shared is not None:
            self.shared.set_state(self.shared_state)

    def restore(self, seq: Sequence) -> None:
        if (state := self.seeded.get(id(seq))) is not None:
            seq.generator.set_state(state)
