"""End-to-end tests: `aserve serve` as a real subprocess on the real default model.

The model is SmolLM2-135M-Instruct, resolved like `aserve serve` with no --model does: from
$ASERVE_CACHE_DIR if set, else ~/.cache/aserve. The first run downloads (~93 MB) and converts it
(~25 s); later runs reuse the cache. Run only these with `pytest -m e2e`, skip them with `-m "not e2e"`.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import aiohttp
import numpy as np
import openai
import orjson
import pytest
import torch
from openapi_schema import assert_valid

from aserve.models.loader import resolve_dtype
from aiohttp_sse_client.client import READY_STATE_CONNECTING, EventSource

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 300.0  # a first run downloads and converts the model
STOP_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 60.0
MAX_NUM_SEQS = 4
MAX_MODEL_LEN = 1024
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Write a long story about a dragon."}]

_SERVING = re.compile(r"serving (?P<name>.+?) at (?P<url>http://\S+)")
# The CLI's log format is "%(asctime)s %(levelname)s %(name)s: %(message)s".
_ERROR_LOG = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) ", re.MULTILINE)


# ---------------------------------------------------------------------------
# The server process
# ---------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m aserve serve` in the repo root (so config.toml is read), stdout+stderr captured."""

    def __init__(self, *extra_args: str, defaults: bool = False) -> None:
        """`defaults`: the server as `make serve` starts it, without this module's smaller limits."""
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_name: str | None = None
        self.announced_url: str | None = None
        limits = [] if defaults else ["--max-num-seqs", str(MAX_NUM_SEQS), "--max-model-len", str(MAX_MODEL_LEN)]
        cmd = [sys.executable, "-m", "aserve", "serve", "--port", str(self.port), *limits, *extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # ASERVE_CACHE_DIR, if set, passes through
        self._lines: list[str] = []
        self._ready = threading.Event()
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, encoding="utf-8", errors="replace")
        # A thread drains the pipe for the whole life of the process, so it can never fill up.
        self._reader = threading.Thread(target=self._read, name="aserve-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)
            if not self._ready.is_set() and (m := _SERVING.search(line)):
                name = m["name"]
                self.model_name = ast.literal_eval(name) if name[:1] in "'\"" else name
                self.announced_url = m["url"].rstrip("/")
                self._ready.set()
        self._ready.set()  # EOF: the process died before serving

    @property
    def output(self) -> str:
        return "".join(self._lines)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        if not self._ready.wait(timeout) or self.model_name is None:
            self.kill()
            pytest.fail(f"aserve did not print its 'serving ... at http://...' line within {timeout:.0f} s "
                        f"(exit code {self.proc.returncode}); output:\n{self.output[-5000:]}")
        assert self.announced_url is not None and self.announced_url.endswith(f":{self.port}"), self.output

    def stop(self, sig: signal.Signals) -> tuple[int, float]:
        """Sends `sig`; returns (exit code, seconds to exit). Fails if it takes over STOP_TIMEOUT_S."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"aserve did not exit within {STOP_TIMEOUT_S:.0f} s of {sig.name}; "
                        f"output:\n{self.output[-5000:]}")
        elapsed = time.monotonic() - start
        self._reader.join(5)
        return code, elapsed

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)

    def assert_clean_exit(self, sig: signal.Signals) -> float:
        code, elapsed = self.stop(sig)
        out = self.output
        assert code == 0, f"exit code {code} after {sig.name}; output:\n{out[-5000:]}"
        assert "Traceback" not in out, f"traceback in the server's output:\n{out[-5000:]}"
        assert not _ERROR_LOG.search(out), f"error logged by the server:\n{out[-5000:]}"
        assert "aserve: shutting down" in out, out[-2000:]
        return elapsed


def _start(*extra_args: str, defaults: bool = False) -> ServerProcess:
    server = ServerProcess(*extra_args, defaults=defaults)
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    srv = _start()
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.assert_clean_exit(signal.SIGINT)
        else:
            pytest.fail(f"aserve exited early with code {srv.proc.returncode}:\n{srv.output[-5000:]}")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
        yield session


# ---------------------------------------------------------------------------
# Client helpers
# ---------------------------------------------------------------------------
def _payload(messages: list[dict], *, stream: bool, max_tokens: int, **extra) -> dict:
    return {"messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": stream, **extra}


async def _sse_events(http: aiohttp.ClientSession, url: str, payload: dict,
                      path: str = "/v1/chat/completions") -> tuple[list[dict], bool]:
    """POSTs a streaming request with aiohttp-sse-client; returns (parsed chunks, saw [DONE])."""
    es: EventSource | None = None

    def on_error() -> None:
        # aiohttp-sse-client 0.2.1 treats the end of the body as a dropped connection and would
        # POST again (a second generation); raising here stops that (see bench/load.py).
        if es is not None and es.ready_state == READY_STATE_CONNECTING:
            raise AssertionError("the stream ended before 'data: [DONE]'")

    chunks: list[dict] = []
    es = EventSource(url + path, option={"method": "POST"}, session=http, json=payload,
                     max_connect_retry=0, reconnection_time=timedelta(0), on_error=on_error, headers={})
    async with es:
        async for event in es:
            if event.data == "[DONE]":
                return chunks, True  # stop here, or the library would reconnect
            chunks.append(orjson.loads(event.data))
    return chunks, False


async def _raw_stream(http: aiohttp.ClientSession, url: str, payload: dict) -> tuple[list[bytes], bool]:
    """The `data:` payloads of a stream as raw bytes (no decoding by a client library)."""
    events: list[bytes] = []
    async with http.post(url + "/v1/chat/completions", json=payload) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            if line.startswith(b"data: "):
                data = line[len(b"data: "):].rstrip(b"\r\n")
                if data == b"[DONE]":
                    return events, True
                events.append(data)
    return events, False


def _content(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


async def _health(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(url + "/health") as resp:
        assert resp.status == 200
        return await resp.json()


async def _wait_idle(http: aiohttp.ClientSession, url: str, within: float = 5.0) -> dict:
    deadline = time.monotonic() + within
    while True:
        h = await _health(http, url)
        if h["running"] == 0 and h["waiting"] == 0 and h["kv_blocks_free"] == h["kv_blocks_total"]:
            return h
        if time.monotonic() > deadline:
            pytest.fail(f"the server is not idle {within:.0f} s after the last client left: {h}")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------
@pytest.mark.e2e
async def test_health_and_models_list(server: ServerProcess, http: aiohttp.ClientSession) -> None:
    assert server.model_name == DEFAULT_MODEL_ID
    h = await _health(http, server.url)
    assert h["status"] == "ok"
    # The default 2 GiB of keys/values: 30 layers x 3 kv heads x 64 x 2 values a position for SmolLM2-135M, in the
    # dtype that auto picks on this CPU (bfloat16 where it has AVX512-BF16 or AMX, else float32).
    itemsize = resolve_dtype("auto", torch.device("cpu"))[0].itemsize
    assert (h["kv_blocks_total"], h["kv_block_size"]) == (2**31 // (16 * 30 * 3 * 64 * 2 * itemsize), 16)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as client:
        models = client.models.list()
        assert [m.id for m in models.data] == [server.model_name]
        assert client.models.retrieve(server.model_name).id == server.model_name


@pytest.mark.e2e
async def test_sse_client_stream(server: ServerProcess, http: aiohttp.ClientSession) -> None:
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        chunks, done = await _sse_events(http, server.url, _payload(CAPITAL, stream=True, max_tokens=64))
    assert done, "the stream did not end with data: [DONE]"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == server.model_name for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "Paris" in _content(chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.e2e
def test_openai_sdk_sync(server: ServerProcess) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                       timeout=REQUEST_TIMEOUT_S) as client:
        resp = client.chat.completions.create(model=server.model_name, messages=CAPITAL, temperature=0,
                                              max_tokens=64)
        assert resp.model == server.model_name
        choice = resp.choices[0]
        assert "Paris" in choice.message.content
        assert choice.message.role == "assistant"
        assert choice.finish_reason == "stop"
        assert resp.usage is not None
        assert resp.usage.prompt_tokens > 0 and 0 < resp.usage.completion_tokens <= 64
        assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens

        chunks = list(client.chat.completions.create(
            model=server.model_name, messages=CAPITAL, temperature=0, max_tokens=64, stream=True,
            stream_options={"include_usage": True}))
    assert_valid("CreateChatCompletionResponse", resp.model_dump(mode="json", exclude_unset=True))
    for chunk in chunks:
        assert_valid("CreateChatCompletionStreamResponse", chunk.model_dump(mode="json", exclude_unset=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in content
    assert content == choice.message.content  # temperature 0: the same text either way
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump() == resp.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


@pytest.mark.e2e
async def test_openai_sdk_async_stream(server: ServerProcess) -> None:
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                                  timeout=REQUEST_TIMEOUT_S) as client:
        stream = await client.chat.completions.create(model=server.model_name, messages=CAPITAL,
                                                      temperature=0, max_tokens=64, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "Paris" in "".join(parts)


@pytest.mark.e2e
async def test_openai_sdk_async_non_stream_with_a_json_schema(server: ServerProcess) -> None:
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                                  timeout=REQUEST_TIMEOUT_S) as client:
        resp = await client.chat.completions.create(
            model=server.model_name, response_format=fmt, max_tokens=120, temperature=0,
            messages=[{"role": "user", "content": "Invent a person. Reply in JSON with name, age and city."}])
    assert_valid("CreateChatCompletionResponse", resp.model_dump(mode="json", exclude_unset=True))
    assert resp.choices[0].finish_reason == "stop"
    jsonschema.validate(orjson.loads(resp.choices[0].message.content), PERSON)


@pytest.mark.e2e
def test_openai_sdk_sync_completions_stream(server: ServerProcess) -> None:
    from test_openai_fields import assert_valid_completion

    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                       timeout=REQUEST_TIMEOUT_S) as client:
        whole = client.completions.create(model=server.model_name, prompt="The capital of France is",
                                          max_tokens=8, temperature=0)
        chunks = list(client.completions.create(model=server.model_name, prompt="The capital of France is",
                                                max_tokens=8, temperature=0, stream=True))
    for chunk in chunks:
        assert_valid_completion(chunk.model_dump(mode="json", exclude_unset=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


@pytest.mark.e2e
async def test_disconnect_mid_stream_frees_its_blocks(server: ServerProcess, http: aiohttp.ClientSession) -> None:
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        await _wait_idle(http, server.url)
        resp = await http.post(server.url + "/v1/chat/completions",
                               json=_payload(STORY, stream=True, max_tokens=500))
        assert resp.status == 200
        content_events = 0
        async for line in resp.content:
            if line.startswith(b"data: ") and b'"content":"' in line and b'"content":""' not in line:
                content_events += 1
                if content_events == 3:
                    break
        during = await _health(http, server.url)
        # The chat prompt and a few tokens: a few blocks of 16, not a reservation for max_model_len.
        assert during["running"] == 1 and 0 < during["kv_blocks_total"] - during["kv_blocks_free"] <= 4, during
        resp.close()  # drops the connection mid-stream
        after = await _wait_idle(http, server.url, within=5.0)
        # The aborted request stopped decoding: far short of its 500 tokens, and nothing runs on.
        assert 0 <= after["steps"] - during["steps"] < 100, (during, after)
        await asyncio.sleep(0.3)
        assert (await _health(http, server.url))["steps"] == after["steps"]

        # All the capacity is usable again: 4 streams decode at once.
        started = [asyncio.Event() for _ in range(MAX_NUM_SEQS)]

        async def one(i: int) -> tuple[str, str | None, dict | None]:
            text, finish, usage = "", None, None
            async with http.post(server.url + "/v1/chat/completions",
                                 json=_payload(STORY, stream=True, max_tokens=40,
                                               stream_options={"include_usage": True})) as r:
                assert r.status == 200, await r.text()
                async for line in r.content:
                    if not line.startswith(b"data: "):
                        continue
                    if line.strip() == b"data: [DONE]":
                        return text, finish, usage
                    chunk = orjson.loads(line[len(b"data: "):])
                    assert "error" not in chunk, chunk
                    usage = chunk.get("usage") or usage
                    if chunk["choices"]:
                        text += chunk["choices"][0]["delta"].get("content") or ""
                        finish = chunk["choices"][0]["finish_reason"] or finish
                        if text:
                            started[i].set()
            raise AssertionError("stream ended without [DONE]")

        tasks = [asyncio.create_task(one(i)) for i in range(MAX_NUM_SEQS)]
        all_started = asyncio.ensure_future(asyncio.gather(*(e.wait() for e in started)))
        await asyncio.wait([all_started, *tasks], return_when=asyncio.FIRST_COMPLETED)
        busy = await _health(http, server.url) if all_started.done() else None
        all_started.cancel()
        results = await asyncio.gather(*tasks)
    assert busy is not None, "a stream ended before all of them had started"
    assert busy["running"] == MAX_NUM_SEQS, busy
    for text, finish, usage in results:
        assert text and finish == "length" and usage["completion_tokens"] == 40
    await _wait_idle(http, server.url)


@pytest.mark.e2e
@pytest.mark.parametrize(("prompt", "max_tokens"), [
    ("Translate 'hello world' into Chinese.", 64),
    # 11 tokens: SmolLM2 spends 3 byte tokens per emoji, so the 4th is cut after 2 of them; those
    # partial bytes must not come out as U+FFFD.
    ("Reply with three emoji.", 11),
], ids=["chinese", "emoji"])
async def test_multibyte_stream_matches_non_stream(server: ServerProcess, http: aiohttp.ClientSession,
                                                    prompt: str, max_tokens: int) -> None:
    messages = [{"role": "user", "content": prompt}]
    # Each request computes its prompt itself (its own cache salt): in bfloat16, attention over a
    # cached prefix rounds differently from the prefill that cached it, and greedy text can drift.
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        events, done = await _raw_stream(http, server.url, {**_payload(messages, stream=True, max_tokens=max_tokens),
                                                             "cache_salt": "stream"})
        async with http.post(server.url + "/v1/chat/completions",
                             json={**_payload(messages, stream=False, max_tokens=max_tokens),
                                   "cache_salt": "whole"}) as resp:
            assert resp.status == 200
            body = orjson.loads(await resp.read())
    assert done
    chunks = [orjson.loads(e.decode("utf-8", errors="strict")) for e in events]  # every event is valid UTF-8
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]]
    assert not [d for d in deltas if "\ufffd" in d], deltas
    streamed = "".join(deltas)
    expected = body["choices"][0]["message"]["content"]
    assert "\ufffd" not in expected
    assert any(ord(ch) > 0x7F for ch in streamed), f"no multi-byte character to test in {streamed!r}"
    assert streamed == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]


async def _until_first_token(lines: AsyncIterator[bytes]) -> None:
    while b'"content":"' not in (line := await anext(lines)) or b'"content":""' in line:
        pass


def _data(lines: list[bytes]) -> list[bytes]:
    return [line[len(b"data: "):].strip() for line in lines if line.startswith(b"data: ")]


@pytest.mark.e2e
async def test_sigterm_drains_then_ends_the_streams_left(http: aiohttp.ClientSession) -> None:
    """SIGTERM: new requests get 503 while running ones drain; a stream that finishes within
    shutdown_timeout ends normally, one that does not ends with an error event and [DONE]; the
    server exits 0 with no traceback."""
    grace = 3.0
    srv = await asyncio.to_thread(_start, "--shutdown-timeout", str(grace))
    url = srv.url + "/v1/chat/completions"
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            async with http.post(url, json=_payload(STORY, stream=True, max_tokens=800, ignore_eos=True)) as long, \
                    http.post(url, json=_payload(CAPITAL, stream=True, max_tokens=8)) as short:
                assert long.status == short.status == 200
                long_lines, short_lines = aiter(long.content), aiter(short.content)
                await _until_first_token(long_lines)
                await _until_first_token(short_lines)
                stopping = asyncio.create_task(asyncio.to_thread(srv.assert_clean_exit, signal.SIGTERM))
                short_rest = [line async for line in short_lines]
                async with aiohttp.ClientSession() as fresh:  # a new connection, while draining
                    async with fresh.post(url, json=_payload(CAPITAL, stream=True, max_tokens=4)) as refused:
                        refused_status, refused_body = refused.status, await refused.json()
                long_rest = [line async for line in long_lines]
            elapsed = await stopping
    finally:
        srv.kill()
    short_data = _data(short_rest)
    assert short_data[-1] == b"[DONE]" and orjson.loads(short_data[-2])["choices"][0]["finish_reason"] in ("stop",
                                                                                                         "length")
    assert refused_status == 503 and refused_body["error"]["code"] == "shutting_down", refused_body
    long_data = _data(long_rest)
    assert long_data and long_data[-1] == b"[DONE]", long_rest[-3:]
    last = orjson.loads(long_data[-2])
    assert last["error"]["code"] == "shutting_down" and "shutting down" in last["error"]["message"], last
    assert elapsed < grace + 3.0, f"took {elapsed:.1f} s to stop with shutdown_timeout {grace}"


# ---------------------------------------------------------------------------
# API completeness on the real model (issue 4)
# ---------------------------------------------------------------------------
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "city": {"type": "string", "maxLength": 20}},
          "required": ["name", "age", "city"], "additionalProperties": False}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.mark.e2e
async def test_guided_json_schema_twenty_requests_all_validate(server: ServerProcess,
                                                               http: aiohttp.ClientSession) -> None:
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    messages = [{"role": "user", "content": "Invent a person. Reply in JSON with name, age and city."}]

    async def one(seed: int) -> dict:
        body = {"messages": messages, "response_format": fmt, "max_tokens": 120, "temperature": 0.8, "seed": seed}
        async with http.post(server.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async with asyncio.timeout(4 * REQUEST_TIMEOUT_S):
        results = await asyncio.gather(*(one(seed) for seed in range(20)))
    for body in results:
        assert_valid("CreateChatCompletionResponse", body)
        assert body["choices"][0]["finish_reason"] == "stop"
        jsonschema.validate(orjson.loads(body["choices"][0]["message"]["content"]), PERSON)
    assert len({b["choices"][0]["message"]["content"] for b in results}) > 1


@pytest.mark.e2e
def test_openai_sdk_completions_echo_and_logprobs(server: ServerProcess) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                       timeout=REQUEST_TIMEOUT_S) as client:
        resp = client.completions.create(model=server.model_name, prompt="The capital of France is",
                                         max_tokens=8, temperature=0, logprobs=2, echo=True, user="u1")
    choice = resp.choices[0]
    assert resp.object == "text_completion"
    assert choice.text.startswith("The capital of France is") and "Paris" in choice.text
    lp = choice.logprobs
    assert len(lp.tokens) == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)


@pytest.mark.e2e
async def test_openai_sdk_async_completions_stream_with_n(server: ServerProcess) -> None:
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                                  timeout=REQUEST_TIMEOUT_S) as client:
        stream = await client.completions.create(model=server.model_name, prompt=["Once upon a time", "1, 2, 3,"],
                                                 n=2, max_tokens=6, temperature=0.9, seed=7, stream=True)
        texts: dict[int, str] = {}
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
    assert sorted(texts) == [0, 1, 2, 3] and all(texts.values())


@pytest.mark.e2e
def test_openai_sdk_chat_n_logprobs_and_named_tool(server: ServerProcess) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                       timeout=REQUEST_TIMEOUT_S) as client:
        resp = client.chat.completions.create(model=server.model_name, messages=CAPITAL, n=2, max_tokens=10,
                                              temperature=0, logprobs=True, top_logprobs=3)
        assert [c.index for c in resp.choices] == [0, 1]
        assert resp.choices[0].message.content == resp.choices[1].message.content  # greedy
        entries = resp.choices[0].logprobs.content
        assert len(entries) * 2 == resp.usage.completion_tokens  # one entry per counted token, EOS included
        shown = entries[:-1] if resp.choices[0].finish_reason == "stop" else entries
        assert "".join(e.token for e in shown) == resp.choices[0].message.content
        assert all(len(e.top_logprobs) == 3 for e in entries)

        weather = [{"role": "user", "content": "What is the weather in Paris?"}]
        resp = client.chat.completions.create(
            model=server.model_name, messages=weather, tools=[WEATHER_TOOL], max_tokens=40,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = resp.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and "city" in orjson.loads(call.function.arguments)
    assert resp.choices[0].finish_reason == "tool_calls"


@pytest.mark.e2e
async def test_openai_sdk_async_stream_of_required_tool_call(server: ServerProcess) -> None:
    weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                                  timeout=REQUEST_TIMEOUT_S) as client:
        stream = await client.chat.completions.create(model=server.model_name, messages=weather,
                                                      tools=[WEATHER_TOOL], tool_choice="required", max_tokens=60,
                                                      temperature=0, stream=True)
        name, arguments, finish = "", "", None
        async for chunk in stream:
            for call in chunk.choices[0].delta.tool_calls or []:
                name += call.function.name or ""
                arguments += call.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and "city" in orjson.loads(arguments)
    assert finish == "tool_calls"


@pytest.mark.e2e
async def test_sse_client_completions_stream(server: ServerProcess, http: aiohttp.ClientSession) -> None:
    payload = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stream": True}
    async with asyncio.timeout(REQUEST_TIMEOUT_S):
        chunks, done = await _sse_events(http, server.url, payload, path="/v1/completions")
    assert done and all(c["object"] == "text_completion" for c in chunks)
    assert "Paris" in "".join(c["choices"][0]["text"] for c in chunks)


@pytest.mark.e2e
async def test_tokenize_detokenize_round_trip_on_the_real_tokenizer(server: ServerProcess,
                                                                   http: aiohttp.ClientSession) -> None:
    async with http.post(server.url + "/tokenize", json={"messages": CAPITAL}) as resp:
        tokens = (await resp.json())["tokens"]
    async with http.post(server.url + "/detokenize", json={"tokens": tokens}) as resp:
        text = (await resp.json())["prompt"]
    assert text.endswith("What is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.e2e
async def test_the_default_server_serves_the_models_whole_context(http: aiohttp.ClientSession) -> None:
    # The KV cache is paged, so the default max_model_len is SmolLM2's own 8,192 tokens, not a
    # per-request reservation: a 4,000-token prompt is answered, a 10,000-token one is refused.
    server = _start(defaults=True)
    try:
        async with asyncio.timeout(120):
            sentence = "The lighthouse keeper wrote down the weather every morning. "
            long_text = sentence * 400  # 10 tokens each: ~4,000 tokens
            async with http.post(server.url + "/v1/completions",
                                 json={"prompt": long_text, "max_tokens": 4, "temperature": 0}) as resp:
                body = await resp.json()
            assert resp.status == 200, body
            assert 3900 <= body["usage"]["prompt_tokens"] <= 8192 - 4 and body["choices"][0]["text"]
            async with http.post(server.url + "/v1/completions",
                                 json={"prompt": sentence * 1000, "max_tokens": 4}) as resp:
                error = (await resp.json())["error"]
            assert resp.status == 400 and "8192" in error["message"], error
            assert error["code"] == "context_length_exceeded"
            h = await _health(http, server.url)
            assert h["kv_blocks_free"] == h["kv_blocks_total"]
    finally:
        server.assert_clean_exit(signal.SIGTERM)


@pytest.mark.e2e
def test_lora_adapters_on_the_default_model_through_the_sdk(tmp_path: Path) -> None:
    import json
    import urllib.request

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from aserve.models.store import default_cache_dir, resolve_model

    base = resolve_model(None, default_cache_dir())
    for seed, name in enumerate(("alpha", "beta", "gamma")):  # random, not zero B: each changes the answer
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        get_peft_model(model, LoraConfig(r=8, lora_alpha=64, init_lora_weights=False, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])).save_pretrained(tmp_path / name)
    srv = _start("--enable-lora", "true", "--lora-modules", f"alpha={tmp_path / 'alpha'},beta={tmp_path / 'beta'}",
                 "--allow-runtime-lora-updating", "true")

    def post(path: str, body: dict) -> int:
        request = urllib.request.Request(srv.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as resp:
            return resp.status

    try:
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0) as client:
            assert [m.id for m in client.models.list().data] == [srv.model_name, "alpha", "beta"]

            def answer(model: str, salt: str | None = None) -> str:
                return client.chat.completions.create(model=model, messages=CAPITAL, temperature=0, max_tokens=16,
                                                      extra_body={"cache_salt": salt} if salt else None
                                                      ).choices[0].message.content

            answers = {model: answer(model) for model in (srv.model_name, "alpha", "beta")}
            assert "Paris" in answers[srv.model_name]
            assert len(set(answers.values())) == 3, answers
            assert post("/v1/load_lora_adapter", {"lora_name": "gamma", "lora_path": str(tmp_path / "gamma")}) == 200
            assert "gamma" in [m.id for m in client.models.list().data]
            assert answer("gamma") not in answers.values()
            assert post("/v1/unload_lora_adapter", {"lora_name": "alpha"}) == 200
            with pytest.raises(openai.NotFoundError):
                answer("alpha")
            # The other adapter is untouched (its prompt computed afresh, as the first time: in bfloat16
            # a cached prefix may round differently).
            assert answer("beta", salt="afresh") == answers["beta"]
    finally:
        srv.assert_clean_exit(signal.SIGTERM)


def test_anthropic_sdk_messages_on_the_real_model(server: ServerProcess) -> None:
    import anthropic

    with anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0) as client:
        message = client.messages.create(model=server.model_name, max_tokens=16, messages=CAPITAL,
                                         extra_body={"temperature": 0})
        with client.messages.stream(model=server.model_name, max_tokens=16, messages=CAPITAL,
                                    extra_body={"temperature": 0}) as stream:
            streamed = "".join(stream.text_stream)
    assert "Paris" in message.content[0].text and streamed == message.content[0].text


def test_openai_sdk_responses_on_the_real_model(server: ServerProcess) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as client:
        first = client.responses.create(model=server.model_name, input=CAPITAL[0]["content"], temperature=0,
                                        max_output_tokens=16)
        follow = client.responses.create(model=server.model_name, input="And of Italy?", temperature=0,
                                         previous_response_id=first.id, max_output_tokens=16)
    assert "Paris" in first.output_text and "Rome" in follow.output_text, (first.output_text, follow.output_text)


def test_the_chat_model_embeds_normalized_vectors(server: ServerProcess) -> None:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as client:
        data = client.embeddings.create(model=server.model_name, input=["Paris is in France.", "Hello"]).data
    vectors = [np.array(d.embedding) for d in data]
    assert [v.shape for v in vectors] == [(576,), (576,)]
    assert all(abs(np.linalg.norm(v) - 1) < 1e-3 for v in vectors)


def test_the_embedding_model_by_name_matches_sentence_transformers() -> None:
    from sentence_transformers import SentenceTransformer

    from aserve.models.store import EMBEDDING_MODEL, default_cache_dir

    texts = ["Hello world", "The quick brown fox jumps over the lazy dog.", "日本語の文も一つ。", "emoji 👋 !?", "x",
             "def add(a, b): return a + b", "A longer sentence about printing presses, books and literacy " * 3]
    srv = _start("--model", EMBEDDING_MODEL, defaults=True)
    try:
        with openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0) as client:
            ours = np.array([d.embedding for d in client.embeddings.create(model=EMBEDDING_MODEL, input=texts).data])
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model=EMBEDDING_MODEL, messages=CAPITAL)
        reference = SentenceTransformer(str(default_cache_dir() / EMBEDDING_MODEL), device="cpu").encode(texts)
        cosines = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
        assert cosines.min() >= 0.9999, cosines
    finally:
        srv.assert_clean_exit(signal.SIGTERM)
