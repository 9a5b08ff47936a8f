#!/usr/bin/env python
"""Baseline: the same model served "the way most tutorials do", for comparison with aserve.

Each request gets its own thread running transformers' `model.generate(...,
streamer=TextIteratorStreamer(...))` on one shared model: no batching, no KV-cache reuse,
requests run concurrently only as threads competing for the CPU/GPU. The handler relays
the streamer's text as OpenAI chat.completion.chunk events, so bench/load.py and
bench/sweep.py drive it exactly like aserve. Same dtype rule (bfloat16 on CUDA, float32 on
CPU), same torch thread count (--num-threads 0 = torch's default, as aserve), same chat
template, same max_model_len check, EOS counted as a completion token (as aserve does).

    python bench/baseline_server.py --port 8001            # default model, converted by aserve
"""
from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import torch
from aiohttp import web

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, TextIteratorStreamer  # noqa: E402

from aserve.models.store import default_cache_dir, resolve_model  # noqa: E402

# Each open stream blocks one thread in next(streamer): the default executor (cpu+4 threads)
# would serialise 64 streams, so the relay gets a pool of its own.
RELAY_POOL = ThreadPoolExecutor(max_workers=1024, thread_name_prefix="relay")


class Cancelled(StoppingCriteria):
    """Stops generate() once the client has gone away (tutorials often forget this)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def error(status: int, message: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


class Baseline:
    def __init__(self, args: argparse.Namespace) -> None:
        path = resolve_model(args.model, default_cache_dir())
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
        if args.num_threads > 0:
            torch.set_num_threads(args.num_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        self.name = args.served_model_name or Path(path).name
        self.max_model_len = min(args.max_model_len, self.model.config.max_position_embeddings)
        eos = self.model.generation_config.eos_token_id
        self.eos = sorted({*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                           *([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])})
        self.running = 0
        self.created = int(time.time())
        print(f"baseline: {path} on {device} ({dtype}), torch threads={torch.get_num_threads()}", flush=True)

    def generate(self, ids: torch.Tensor, kwargs: dict, streamer: TextIteratorStreamer, out: dict) -> None:
        try:
            with torch.inference_mode():
                out["ids"] = self.model.generate(ids, streamer=streamer, **kwargs)
        except Exception as exc:  # noqa: BLE001 - report it in the stream
            out["error"] = f"{type(exc).__name__}: {exc}"
            streamer.end()  # unblock the relay

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.name, "object": "model", "created": self.created, "owned_by": "baseline",
                "max_model_len": self.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "running": self.running})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            req = orjson.loads(await request.read())
            messages = req["messages"]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001
            return error(400, f"bad request: {exc}")
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(self.model.device)
        room = self.max_model_len - ids.shape[1]
        max_tokens = req.get("max_completion_tokens") or req.get("max_tokens") or room
        if max_tokens > room:
            return error(400, f"prompt ({ids.shape[1]}) + max_tokens ({max_tokens}) > {self.max_model_len}", "messages")
        temperature = 1.0 if req.get("temperature") is None else float(req["temperature"])
        sampling = {"do_sample": False} if temperature < 1e-5 else {
            "do_sample": True, "temperature": temperature, "top_p": req.get("top_p") or 1.0, "top_k": req.get("top_k") or 0}
        cancel = threading.Event()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(max_new_tokens=max_tokens, eos_token_id=self.eos, pad_token_id=self.eos[0],
                      stopping_criteria=[Cancelled(cancel)], **sampling)
        out: dict = {}
        worker = threading.Thread(target=self.generate, args=(ids, kwargs, streamer, out), daemon=True)
        worker.start()

        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream, usage_wanted = bool(req.get("stream")), bool((req.get("stream_options") or {}).get("include_usage"))
        loop = asyncio.get_running_loop()

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if usage_wanted:
                body["usage"] = None
            return b"data: " + orjson.dumps(body) + b"\n\n"

        self.running += 1
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            if stream:
                await resp.prepare(request)
                await resp.write(chunk({"role": "assistant", "content": ""}))
            parts = []
            while (piece := await loop.run_in_executor(RELAY_POOL, next, streamer, None)) is not None:
                if piece:
                    parts.append(piece)
                    if stream:
                        await resp.write(chunk({"content": piece}))
            await loop.run_in_executor(RELAY_POOL, worker.join)  # end() comes just before generate() returns
            if "error" in out or "ids" not in out:
                err = {"error": {"message": out.get("error", "generation failed"), "type": "server_error"}}
                if not stream:
                    return web.json_response(err, status=500)
                await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
            else:
                completion = out["ids"].shape[1] - ids.shape[1]
                finish = "stop" if completion and int(out["ids"][0, -1]) in self.eos else "length"
                usage = {"prompt_tokens": ids.shape[1], "completion_tokens": completion,
                         "total_tokens": ids.shape[1] + completion}
                if not stream:
                    return web.json_response({
                        "id": rid, "object": "chat.completion", "created": created, "model": self.name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                                     "logprobs": None, "finish_reason": finish}], "usage": usage})
                await resp.write(chunk({}, finish))
                if usage_wanted:
                    await resp.write(b"data: " + orjson.dumps({"id": rid, "object": "chat.completion.chunk",
                                     "created": created, "model": self.name, "choices": [], "usage": usage}) + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.running -= 1
            cancel.set()  # a no-op after a normal finish; stops generate() if the client left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF directory (default: aserve's default model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--num-threads", type=int, default=0, help="torch threads; 0: torch's default, as aserve")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--served-model-name", default=None)
    args = parser.parse_args()
    app = web.Application(client_max_size=4 * 1024 * 1024)
    server = Baseline(args)
    app.add_routes([web.post("/v1/chat/completions", server.chat), web.get("/v1/models", server.models),
                    web.get("/health", server.health)])
    print(f"baseline: serving '{server.name}' at http://{args.host}:{args.port}", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
