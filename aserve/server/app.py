"""Server wiring: routes, middleware, and the step loop's lifetime inside the app's."""

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

from aiohttp import web

import aserve
from aserve.config import ServerConfig
from aserve.server import objects, protocol
from aserve.server.chat import chat_completions
from aserve.server.completions import completions
from aserve.server.errors import ERROR_HOOK, error_middleware, json_response
from aserve.server.metrics import CONTENT_TYPE
from aserve.server.middleware import REQUEST_ID, add_request_id, api_key_middleware, host_check_middleware, is_loopback
from aserve.server.lora import add_lora_routes
from aserve.server.embeddings import add_embeddings_routes
from aserve.server.messages import add_messages_routes
from aserve.server.responses import add_responses_routes
from aserve.server.page import add_page_routes
from aserve.server.serving import ServingState
from aserve.server.tokenize import detokenize, tokenize


async def list_models(request: web.Request) -> web.Response:
    state = request.app[ServingState.KEY]
    return json_response(objects.model_list(state.model_name, state.max_model_len, state.created,
                                            {n: a.path for n, a in state.lora_adapters.items()}))


async def get_model(request: web.Request) -> web.Response:
    state = request.app[ServingState.KEY]
    name = request.match_info["model"]
    if (adapter := state.check_model(name, generate=False)) is not None:
        return json_response(objects.model_card(adapter.name, state.max_model_len, state.created,
                                                parent=state.model_name, root=adapter.path))
    return json_response(objects.model_card(state.model_name, state.max_model_len, state.created))


async def health(request: web.Request) -> web.Response:
    """Readiness (vLLM's path, which routers poll): 200 while the engine runs and the server
    takes requests; 503 once it drains (SIGTERM), so routers and Kubernetes stop sending to it
    while its running requests finish, or when the engine is down."""
    state = request.app[ServingState.KEY]
    alive = state.engine_alive()
    status = "unavailable" if not alive else "draining" if state.draining else "ok"
    fault = {"last_fault": state.engine.last_fault} if state.engine.last_fault else {}
    return json_response({"status": status, **state.engine.stats(), **fault}, status=200 if status == "ok" else 503)


async def live(request: web.Request) -> web.Response:
    """Liveness: 200 while the engine loop runs, draining included (a draining replica must not
    be restarted); 503 once it has died, which only a restart mends."""
    state = request.app[ServingState.KEY]
    alive = state.engine_alive()
    return json_response({"status": "alive" if alive else "dead"}, status=200 if alive else 503)


def _load(state: ServingState) -> int:
    """Sequences in this replica's engine, running and waiting: what load-aware routers compare.
    It counts every client's requests, also those that did not come through a given router."""
    stats = state.engine.stats()
    return int(stats["running"] + stats["waiting"])


async def load(request: web.Request) -> web.Response:
    """vLLM's `GET /load`."""
    return json_response({"server_load": _load(request.app[ServingState.KEY])})


async def get_load(request: web.Request) -> web.Response:
    """vllm-router's `power_of_two` polls `GET /get_load` and reads `load` (SGLang's path)."""
    return json_response({"load": _load(request.app[ServingState.KEY])})


async def version(request: web.Request) -> web.Response:
    return json_response({"version": aserve.__version__})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[ServingState.KEY]
    lora = state.engine.lora_requests()
    body = state.metrics.render(state.engine.stats(), lora,
                                state.engine.scheduler.loras.max_loras if lora is not None else 0, state.engine.faults)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _engine_lifetime(app: web.Application) -> AsyncIterator[None]:
    state = app[ServingState.KEY]
    state.engine_task = asyncio.create_task(state.engine.run(), name="aserve-engine")
    yield
    state.engine.close("the server is shutting down", "shutting_down")
    state.engine_task.cancel()
    # A loop that died has logged why already; shutting down must not fail over it again.
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await state.engine_task
    state.tokenize_pool.shutdown(wait=False, cancel_futures=True)


def create_app(state: ServingState) -> web.Application:
    settings = state.settings
    middlewares = [error_middleware]
    if is_loopback(settings.host):
        middlewares.append(host_check_middleware(settings.allowed_hosts))
    if settings.api_key:
        middlewares.append(api_key_middleware(settings.api_key, settings.metrics_require_api_key))
    app = web.Application(middlewares=middlewares, client_max_size=settings.max_body_bytes)
    app[ServingState.KEY] = state
    app[ERROR_HOOK] = state.metrics.on_error
    app.on_response_prepare.append(add_request_id)
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
        web.get("/health/live", live),
        web.get("/version", version),  # vLLM's
        web.get("/load", load),  # vLLM's
        web.get("/get_load", get_load),  # vllm-router's
        web.get("/metrics", metrics),
    ])
    add_embeddings_routes(app)
    add_messages_routes(app)  # Anthropic's
    add_responses_routes(app)
    if settings.allow_runtime_lora_updating:
        add_lora_routes(app)
    if origins := [o.strip() for o in (settings.cors_allowed_origins or "").split(",") if o.strip()]:
        _allow_cors(app, origins)
    add_page_routes(app)  # same-origin: after the CORS routes
    return app


def _allow_cors(app: web.Application, origins: list[str]) -> None:
    import aiohttp_cors

    options = aiohttp_cors.ResourceOptions(allow_headers=("Authorization", "Content-Type", REQUEST_ID,
                                                                  "x-api-key", "anthropic-version"),
                                           expose_headers=(REQUEST_ID,), allow_methods=("GET", "POST"), max_age=600)
    cors = aiohttp_cors.setup(app, defaults=dict.fromkeys(origins, options))
    for route in list(app.router.routes()):
        cors.add(route)


async def start_server(app: web.Application, host: str, port: int, shutdown_timeout: float = 5.0,
                       ssl_context: ssl.SSLContext | None = None) -> web.AppRunner:
    """Starts serving; returns the runner (runner.addresses has the bound port when port=0)."""
    # handler_cancellation: a client that disconnects cancels its handler, and with it its request.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout, access_log=None)
    await runner.setup()
    # shutdown_timeout belongs to the runner; passing it to the site too is deprecated (and redundant).
    await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    return runner


def server_ssl_context(settings: ServerConfig) -> ssl.SSLContext | None:
    """HTTPS from --ssl-certfile and --ssl-keyfile (both, or neither)."""
    if not settings.ssl_certfile and not settings.ssl_keyfile:
        return None
    if not (settings.ssl_certfile and settings.ssl_keyfile):
        raise ValueError("give both ssl_certfile and ssl_keyfile, or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    return context
