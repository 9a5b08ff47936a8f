"""POST /v1/chat/completions: validate, apply the chat template, tokenize, queue, respond.

Everything that can reject a request happens before the 200 headers go out, so a bad
request is always a real 4xx and never a broken stream.
"""

import logging
import time
import uuid
from contextlib import aclosing

import orjson
from aiohttp import web

from aserve.engine.engine_loop import EngineError, GenerationRequest, RequestOutput
from aserve.engine.sequence import SamplingParams
from aserve.server import protocol
from aserve.server.errors import APIError, json_response
from aserve.server.serving import ServingState
from aserve.server.sse import SSEWriter

log = logging.getLogger("aserve.server")


async def read_json(request: web.Request) -> object:
    body = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise APIError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def sampling_params(req: protocol.ChatCompletionRequest, prompt_len: int, max_model_len: int) -> SamplingParams:
    room = max_model_len - prompt_len
    max_tokens = req.max_completion_tokens or req.max_tokens
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = max_tokens or 1
        raise APIError(
            f"this model's maximum context length is {max_model_len} tokens, but you requested "
            f"{prompt_len + asked} tokens ({prompt_len} in the messages, {asked} in the completion); "
            "shorten the messages or lower max_tokens",
            param="messages", code="context_length_exceeded",
        )
    return SamplingParams(
        max_tokens=max_tokens or room,  # omitted: the room left in the context
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k or 0, 0),
        seed=req.seed,
        stop=tuple(req.stop or ()),
        ignore_eos=bool(req.ignore_eos),
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state: ServingState = request.app[ServingState.KEY]
    req = protocol.parse_chat_request(await read_json(request))
    state.check_model(req.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                for i, m in enumerate(req.messages)]
    prompt_ids = await state.encode_chat(messages)
    params = sampling_params(req, len(prompt_ids), state.max_model_len)
    state.check_engine()
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    outputs = state.engine.generate(GenerationRequest(rid, prompt_ids, params))
    created = int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return await _stream(request, state, rid, created, outputs, include_usage)
    return await _complete(state, rid, created, outputs)


async def _complete(state: ServingState, rid: str, created: int, outputs) -> web.Response:
    parts: list[str] = []
    last: RequestOutput | None = None
    try:
        async with aclosing(outputs):
            async for last in outputs:
                parts.append(last.text)
    except EngineError as exc:
        raise APIError(str(exc), status=500, code="engine_error") from None
    assert last is not None and last.finish_reason is not None
    body = protocol.chat_completion(rid, state.model_name, created, "".join(parts), last.finish_reason,
                                    protocol.usage(last.prompt_tokens, last.completion_tokens))
    return json_response(body)


async def _stream(request: web.Request, state: ServingState, rid: str, created: int, outputs,
                  include_usage: bool) -> web.StreamResponse:
    sse = SSEWriter(request)
    chunk = lambda delta, finish=None: protocol.chat_chunk(  # noqa: E731
        rid, state.model_name, created, delta, finish, include_usage)
    # The generator is closed on every way out (finish, error, client gone), and closing it
    # aborts the request in the engine.
    async with aclosing(outputs):
        await sse.start()
        await sse.send(chunk({"role": "assistant", "content": ""}))
        try:
            async for out in outputs:
                if out.text:
                    await sse.send(chunk({"content": out.text}))
                if out.finish_reason:
                    await sse.send(chunk({}, out.finish_reason))
                    if include_usage:
                        use = protocol.usage(out.prompt_tokens, out.completion_tokens)
                        await sse.send(protocol.usage_chunk(rid, state.model_name, created, use))
        except EngineError as exc:
            await sse.send(APIError(str(exc), status=500, code="engine_error").body())
        except Exception:
            # The 200 headers are out: a 500 response is no longer possible, so the stream
            # itself must end, with an error event and [DONE], or the client waits forever.
            log.exception("request %s failed mid-stream", rid)
            await sse.send(APIError("internal server error", status=500).body())
        await sse.done()
    return sse.response
