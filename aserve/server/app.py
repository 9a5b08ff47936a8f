"""Server wiring: routes, middleware, and the step loop's lifetime inside the app's."""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from aiohttp import web

from aserve.server import protocol, responses
from aserve.server.chat import chat_completions
from aserve.server.completions import completions
from aserve.server.errors import error_middleware, json_response
from aserve.server.serving import ServingState
from aserve.server.tokenize import detokenize, tokenize


async def list_models(request: web.Request) -> web.Response:
    state = request.app[ServingState.KEY]
    return json_response(responses.model_list(state.model_name, state.max_model_len, state.created))


async def get_model(request: web.Request) -> web.Response:
    state = request.app[ServingState.KEY]
    state.check_model(request.match_info["model"])
    return json_response(responses.model_card(state.model_name, state.max_model_len, state.created))


async def health(request: web.Request) -> web.Response:
    state = request.app[ServingState.KEY]
    ok = state.engine_alive()
    return json_response({"status": "ok" if ok else "unavailable", **state.engine.stats()}, status=200 if ok else 503)


async def _engine_lifetime(app: web.Application) -> AsyncIterator[None]:
    state = app[ServingState.KEY]
    state.engine_task = asyncio.create_task(state.engine.run(), name="aserve-engine")
    yield
    state.engine.close("the server is shutting down")
    state.engine_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await state.engine_task
    state.tokenize_pool.shutdown(wait=False, cancel_futures=True)


def create_app(state: ServingState, max_body_bytes: int) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=max_body_bytes)
    app[ServingState.KEY] = state
    app.cleanup_ctx.append(_engine_lifetime)
    app.add_routes([
        web.post("/v1/chat/completions", chat_completions),
        web.post("/v1/completions", completions),
        web.post("/tokenize", tokenize),  # vLLM's
        web.post("/detokenize", detokenize),
        web.get("/v1/models", list_models),
        # `.+`: served names such as "org/model" hold a slash, which {model} alone would not match.
        web.get("/v1/models/{model:.+}", get_model),
        web.get("/health", health),
    ])
    return app


async def start_server(app: web.Application, host: str, port: int, shutdown_timeout: float = 5.0) -> web.AppRunner:
    """Starts serving; returns the runner (runner.addresses has the bound port when port=0)."""
    # handler_cancellation: a client that disconnects cancels its handler, and with it its request.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout, access_log=None)
    await runner.setup()
    # shutdown_timeout belongs to the runner; passing it to the site too is deprecated (and redundant).
    await web.TCPSite(runner, host, port).start()
    return runner
