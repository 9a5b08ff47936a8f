"""What the chat and completions handlers share: request fields into SamplingParams, and
running a request's choices (n per prompt) in the engine as one merged stream.

The choices of one prompt are queued together, the first one first, and the others `follow` it:
they wait for its prompt to be computed and copy its KV, so the prompt is prefilled once.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from aserve.engine.engine_loop import EngineError, GenerationRequest, RequestOutput
from aserve.engine.sampler import TokenLogprobs
from aserve.engine.sequence import SamplingParams
from aserve.models.lora import LoRAAdapter
from aserve.server import protocol
from aserve.server.errors import APIError
from aserve.server.serving import RequestRecord, ServingState


def sampling_params(req: protocol._GenerationRequest, prompt_len: int, state: ServingState, *,
                    max_tokens: int | None, logprobs: int | None = None, prompt_logprobs: int | None = None,
                    names: tuple[str, str] | None = None) -> SamplingParams:
    """`max_tokens`: what the request asked for (None: the default, else the room left).
    `names`: the API's own names for the prompt and max_tokens, for the context-length error."""
    prompt_name, max_tokens_name = names or (
        "messages" if isinstance(req, protocol.ChatCompletionRequest) else "prompt", "max_tokens")
    room = state.max_model_len - prompt_len
    defaults = state.generation_defaults
    if max_tokens is None:
        max_tokens = defaults.get("max_tokens")
        max_tokens = min(max_tokens, room) if max_tokens is not None and room >= 1 else None
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = max_tokens or 1
        raise APIError(
            f"this model's maximum context length is {state.max_model_len} tokens, but you requested "
            f"{prompt_len + asked} tokens ({prompt_len} in the prompt, {asked} in the completion); "
            f"shorten the {prompt_name} or lower {max_tokens_name}",
            param=prompt_name,
            code="context_length_exceeded",
        )
    vocab = state.vocab_size
    bias = tuple((int(k), v) for k, v in (req.logit_bias or {}).items())
    for ids, name in (([t for t, _ in bias], "logit_bias"), (req.stop_token_ids or [], "stop_token_ids")):
        if bad := [t for t in ids if t >= vocab]:
            raise APIError(f"{name}: token id {bad[0]} is out of range; the vocabulary has {vocab} tokens", param=name)

    def pick(value: Any, key: str, fallback: Any) -> Any:
        # The request wins, then the model's generation_config.json, then OpenAI's default.
        return value if value is not None else defaults.get(key, fallback)

    return SamplingParams(
        max_tokens=max_tokens or room,  # omitted: the room left in the context
        temperature=pick(req.temperature, "temperature", 1.0),
        top_p=pick(req.top_p, "top_p", 1.0),
        top_k=max(pick(req.top_k, "top_k", 0), 0),
        seed=req.seed,
        stop=tuple(req.stop or ()),
        ignore_eos=bool(req.ignore_eos),
        stop_token_ids=tuple(req.stop_token_ids or ()),
        min_tokens=req.min_tokens or 0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=pick(req.repetition_penalty, "repetition_penalty", 1.0),
        logit_bias=bias,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )


async def compile_response_format(state: ServingState, response_format: Any) -> Any:
    """The compiled grammar for a JSON response_format (None for text or none), as a 400 if invalid."""
    if response_format is None or response_format.type == "text":
        return None
    return await state.compile_grammar(response_format.model_dump(exclude_none=True))


@dataclass
class Choice:
    """One choice's result, gathered from its outputs."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    stop_sequence: str | None = None  # the stop string that ended it, if one did
    embedding: Any = None  # a pooling request's vector (torch float32 [hidden])

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        if out.embedding is not None:
            self.embedding = out.embedding
        self.stop_sequence = out.stop_sequence
        self.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.finish_reason = out.finish_reason
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens
        self.cached_tokens = out.cached_tokens


def start(state: ServingState, rid: str, prompts: Sequence[list[int]], params: SamplingParams, n: int,
          grammar: Any = None, record: RequestRecord | None = None, cache_salt: str | None = None,
          lora: LoRAAdapter | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Queues n choices per prompt (choice index = prompt index * n + j, as OpenAI numbers them)
    and returns their outputs as one stream of (index, output)."""
    state.check_engine()
    streams = []
    for p, prompt_ids in enumerate(prompts):
        leader = None
        for j in range(n):
            index = p * n + j
            # One seed, n different choices; kept within the 64 bits torch.Generator takes.
            seed = None if params.seed is None else (params.seed + j) % 2**64
            request = GenerationRequest(
                f"{rid}-{index}", prompt_ids, _with_seed(params, seed),
                guide=state.guided.guide(grammar) if grammar is not None else None, follows=leader,
                cache_salt=state.cache_salt(cache_salt, lora), lora=lora)
            leader = leader or request.request_id
            streams.append(state.engine.generate(request))
    timeout = state.settings.request_timeout_seconds
    outputs = _merge(streams, state.settings.sse_keepalive_seconds, time.monotonic() + timeout if timeout else None)
    return outputs if record is None else _recorded(outputs, record, n)


async def _recorded(outputs: AsyncIterator[tuple[int, RequestOutput]], record: RequestRecord,
                    n: int) -> AsyncIterator[tuple[int, RequestOutput]]:
    async with aclosing(outputs):
        async for index, out in outputs:
            if index != HEARTBEAT:
                record.add(index, out, n)
            yield index, out


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
    return params if seed == params.seed else replace(params, seed=seed)


async def collect(outputs: AsyncIterator[tuple[int, RequestOutput]], count: int) -> list[Choice]:
    choices = [Choice(i) for i in range(count)]
    try:
        async with aclosing(outputs):
            async for index, out in outputs:
                if index != HEARTBEAT:
                    choices[index].add(out)
    except (EngineError, RequestTimeout) as exc:
        raise api_error(exc) from None
    return choices


class RequestTimeout(Exception):
    """The request ran past request_timeout_seconds; its sequences are aborted."""


_ENGINE_ERROR_STATUS = {"shutting_down": 503, "engine_unavailable": 503, "server_busy": 503, "invalid_seed": 400,
                        "client_too_slow": 408}


def api_error(exc: EngineError | RequestTimeout) -> APIError:
    if isinstance(exc, RequestTimeout):
        return APIError(str(exc), status=504, code="request_timeout")
    headers = {"Retry-After": "1"} if exc.code == "server_busy" else None
    return APIError(str(exc), status=_ENGINE_ERROR_STATUS.get(exc.code, 500), code=exc.code, headers=headers)


_END = object()
HEARTBEAT = -1  # the index of a (HEARTBEAT, None) item: nothing came for a while


async def _merge(streams: list[AsyncIterator[RequestOutput]], heartbeat: float | None = None,
                 deadline: float | None = None) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Every output of every stream as it comes, and (HEARTBEAT, None) after each `heartbeat`
    seconds without one, so a stream handler can keep its connection alive. Closing this
    generator (a client gone, an error) cancels the pumps, and each stream's own cleanup aborts
    its request in the engine. Past `deadline` (time.monotonic()) it raises RequestTimeout."""
    # Bounded, so a consumer that stops (a handler blocked writing to a client that does not
    # read) stops the pumps too: the tokens then wait in the engine, which counts them against
    # max_buffered_tokens and drops the request past it, instead of piling up here unseen.
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue(maxsize=len(streams))

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with aclosing(stream):
                async for out in stream:
                    await queue.put((index, out))
        except Exception as exc:  # handed to the consumer, which raises it
            await queue.put((index, exc))
        await queue.put((index, _END))

    # Tasks start in creation order, so each prompt's first choice is queued before its followers.
    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            wait = heartbeat or None
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RequestTimeout("the request did not finish within the server's request timeout")
                wait = min(wait or left, left)
            try:
                # Cancelling a queue.get() on timeout loses nothing, unlike cancelling a stream.
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
                # that lands as the item arrives, and the handler of a client that left then
                # ran its request to the end.
                async with asyncio.timeout(wait):
                    index, item = await queue.get()
            except TimeoutError:
                if heartbeat and (deadline is None or deadline > time.monotonic()):
                    yield HEARTBEAT, None
                continue
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
