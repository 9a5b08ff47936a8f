"""One request's merged outputs written as an SSE stream: what every streaming endpoint shares.

The endpoint says how an output becomes events (`render`) and how its API frames a stream
(`Framing`); this module owns the stream's life. The 200 headers go out with the first output
(or the first keep-alive, while a request waits in the queue), not before: a request that fails
before it has begun (its engine gone, the server draining, a timeout in the queue) gets a plain
HTTP error, which a router in front can retry on another replica, as it can when this process
dies before answering. Whatever happens after the headers, the stream ends in one of two ways:
with its end (OpenAI's `data: [DONE]`, after an error event if the request failed), or cut, when
the client is gone or has stopped reading. Either way the outputs are closed, which aborts the
request in the engine and frees its KV blocks.
"""

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass

from aiohttp import web

from aserve.engine.engine_loop import EngineError, RequestOutput
from aserve.server import generation
from aserve.server.errors import APIError
from aserve.server.serving import RequestRecord, ServingState
from aserve.server.sse import ClientGone, SSEWriter

log = logging.getLogger("aserve.server")

Render = Callable[[int, RequestOutput], Iterable[dict]]


@dataclass(frozen=True)
class Framing:
    """How an API frames its stream."""

    typed: bool = False  # each event named by its "type" (`event: <type>` before `data:`), as Anthropic's
    done_marker: bool = True  # `data: [DONE]` last, as OpenAI's chat and completions
    keepalive: dict | None = None  # sent (typed) while nothing else is; None: an SSE comment
    error_event: Callable[[APIError], dict] = APIError.body  # what a failure after the headers sends


OPENAI = Framing()


async def write_stream(request: web.Request, state: ServingState, rid: str,
                       outputs: AsyncIterator[tuple[int, RequestOutput]], render: Render, record: RequestRecord,
                       *, opening: Iterable[dict] = (), closing: Callable[[], Iterable[dict]] = lambda: (),
                       framing: Framing = OPENAI) -> web.StreamResponse:
    """`opening`: chunks sent before any output; `closing()`: chunks after the last one (usage)."""
    sse = SSEWriter(request, state.settings.stream_write_timeout_seconds)
    sent_error = False

    async def send(event: dict) -> None:
        await sse.send(event, event["type"] if framing.typed else None)

    async def begin() -> None:
        if not sse.started:
            await sse.start()
            for chunk in opening:
                await send(chunk)

    try:
        async with aclosing(outputs):
            try:
                async for index, out in outputs:
                    await begin()
                    if index == generation.HEARTBEAT:
                        if framing.keepalive is not None:
                            await send(framing.keepalive)
                        else:
                            await sse.comment("keep-alive")
                        continue
                    for chunk in render(index, out):
                        await send(chunk)
                await begin()
                for chunk in closing():
                    await send(chunk)
            except (EngineError, generation.RequestTimeout) as exc:
                if not sse.started:
                    raise generation.api_error(exc) from None  # nothing sent yet: an HTTP error
                sent_error = True
                await _send_error(sse, state, generation.api_error(exc), record, framing)
            except ClientGone:
                raise
            except Exception:
                if not sse.started:
                    raise  # the error middleware's 500
                # The 200 headers are out: a 500 response is no longer possible, so the stream
                # itself must end, with an error event and [DONE], or the client waits forever.
                log.exception("request %s failed mid-stream", rid)
                sent_error = True
                await _send_error(sse, state, APIError("internal server error", status=500), record, framing)
            await sse.done(framing.done_marker)
    except ClientGone as exc:
        log.info("request %s: stream cut: %s", rid, exc)
        if not sent_error:
            record.status, record.error = 499, "client_gone"  # nginx's code for a client that left
        if exc.stalled:
            # Dropped by us, as the engine drops a client too slow to keep up (counted once: the
            # engine's drop was counted as its error event was written). Cut only now, its request
            # closed, since a lost connection cancels this handler (handler_cancellation).
            if not sent_error:
                error = generation.api_error(EngineError(str(exc), "client_too_slow"))
                state.metrics.on_error(error.type, error.status, error.code)
            sse.abort()
    return sse.response


async def _send_error(sse: SSEWriter, state: ServingState, error: APIError, record: RequestRecord,
                      framing: Framing) -> None:
    state.metrics.on_error(error.type, error.status, error.code)
    record.status, record.error = error.status, error.code
    event = framing.error_event(error)
    await sse.send(event, event["type"] if framing.typed else None)
