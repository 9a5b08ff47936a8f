#!/usr/bin/env python
"""Tiny stand-in for `aserve serve`, for testing bench/load.py without a model.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (stream=true
only), GET /stats (request counters, so tests can check that the load script
never re-sends a POST).  Streams a role delta, one content chunk per token
(or --coalesce K tokens per chunk), a finish_reason chunk, a usage chunk with
"choices": [] when stream_options.include_usage is set, then data: [DONE].

Failure injection: --error-every M answers every M-th chat request with HTTP 503;
--truncate-every M closes every M-th stream after a few tokens without [DONE];
--block-ms B burns B ms of CPU on the event loop per chunk (makes /health slow).
"""
from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

MODEL_ID = "fake-model"


@dataclass
class Config:
    ttft_ms: float
    token_ms: float
    coalesce: int
    error_every: int
    truncate_every: int
    block_ms: float


@dataclass
class Stats:
    chat_requests: int = 0
    completed: int = 0


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _chunk(cid: str, created: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL_ID,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def _busy(ms: float) -> None:
    # Deliberately blocks the event loop, like CPU work done inline would.
    end = time.perf_counter() + ms / 1000.0
    while time.perf_counter() < end:
        pass


async def chat(request: web.Request) -> web.StreamResponse:
    cfg: Config = request.app["cfg"]
    stats: Stats = request.app["stats"]
    stats.chat_requests += 1
    n_req = stats.chat_requests
    body = await request.json(loads=orjson.loads)
    if not body.get("stream"):
        return web.json_response({"error": {"message": "fake server only streams"}}, status=400)
    if cfg.error_every and n_req % cfg.error_every == 0:
        return web.json_response({"error": {"message": "injected overload", "type": "server_error"}}, status=503)

    max_tokens = int(body.get("max_tokens") or 16)
    prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    # Vary the length a little so some requests end with "stop" before max_tokens.
    n_tokens = max_tokens if n_req % 3 else max(1, max_tokens - 5)
    finish = "length" if n_tokens == max_tokens else "stop"
    truncate = bool(cfg.truncate_every and n_req % cfg.truncate_every == 0)

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())
    await resp.write(_sse(_chunk(cid, created, {"role": "assistant", "content": ""}, None)))
    await asyncio.sleep(cfg.ttft_ms / 1000.0)

    emitted = 0
    while emitted < n_tokens:
        k = min(cfg.coalesce, n_tokens - emitted)
        if emitted:
            await asyncio.sleep(cfg.token_ms * k / 1000.0)
        if cfg.block_ms:
            _busy(cfg.block_ms)
        text = "".join(f" w{emitted + j}" for j in range(k))
        await resp.write(_sse(_chunk(cid, created, {"content": text}, None)))
        emitted += k
        if truncate and emitted >= 3:
            # Close the connection mid-stream, no [DONE]: the client must not re-POST.
            return resp

    await resp.write(_sse(_chunk(cid, created, {}, finish)))
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n_tokens,
                 "total_tokens": prompt_tokens + n_tokens}
        await resp.write(_sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                               "model": MODEL_ID, "choices": [], "usage": usage}))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    stats.completed += 1
    return resp


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": MODEL_ID, "object": "model", "owned_by": "fake"}]})


async def stats(request: web.Request) -> web.Response:
    s: Stats = request.app["stats"]
    return web.json_response({"chat_requests": s.chat_requests, "completed": s.completed})


def make_app(cfg: Config) -> web.Application:
    app = web.Application()
    app["cfg"] = cfg
    app["stats"] = Stats()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--ttft-ms", type=float, default=30.0, help="delay before the first token")
    p.add_argument("--token-ms", type=float, default=5.0, help="delay per token after the first")
    p.add_argument("--coalesce", type=int, default=1, help="tokens per content chunk")
    p.add_argument("--error-every", type=int, default=0, help="503 every M-th chat request (0: never)")
    p.add_argument("--truncate-every", type=int, default=0, help="cut every M-th stream (0: never)")
    p.add_argument("--block-ms", type=float, default=0.0, help="CPU ms burned on the loop per chunk")
    a = p.parse_args()
    cfg = Config(a.ttft_ms, a.token_ms, max(1, a.coalesce), a.error_every, a.truncate_every, a.block_ms)
    web.run_app(make_app(cfg), host=a.host, port=a.port,
                print=lambda *_: print(f"fake server listening on http://{a.host}:{a.port}", flush=True))


if __name__ == "__main__":
    main()
