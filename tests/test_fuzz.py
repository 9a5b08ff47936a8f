"""Random and malformed bodies (hypothesis) against every POST endpoint: never a 5xx, never a
crash or a hang, and every error is OpenAI-shaped. The server runs on the tiny model in a
thread of its own, so hypothesis drives it with plain blocking requests."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_schema import assert_valid
from test_api import serve

ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"]
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def base_url(tiny_llama_dir) -> Iterator[str]:
    ready: dict[str, str] = {}
    started, stop = threading.Event(), None

    async def main() -> None:
        nonlocal stop
        stop = asyncio.Event()
        async with serve(tiny_llama_dir) as s:
            ready["url"] = s.url
            started.set()
            await stop.wait()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert started.wait(60), "the server did not start"
    yield ready["url"]
    # After all of it, the server is whole: healthy, nothing running or waiting, every KV slot free.
    for _ in range(100):
        with urllib.request.urlopen(ready["url"] + "/health", timeout=TIMEOUT_S) as resp:
            health = json.loads(resp.read())
        if health["running"] == health["waiting"] == 0 and health["kv_blocks_free"] == health["kv_blocks_total"]:
            break
        time.sleep(0.05)
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)
    assert health["status"] == "ok" and health["kv_blocks_free"] == health["kv_blocks_total"], health


def send(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check(status: int, raw: bytes) -> None:
    assert status < 500, raw[:500]
    if status >= 400:
        assert_valid("ErrorResponse", json.loads(raw))
    elif raw.startswith(b"data: "):
        assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
        for event in raw.split(b"\n\n")[:-2]:
            chunk = json.loads(event[len(b"data: "):])
            if "error" in chunk:  # a stream that failed after its 200 says why, in OpenAI's shape
                assert_valid("ErrorResponse", chunk)


scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
FIELDS = ["model", "messages", "prompt", "stream", "max_tokens", "n", "temperature", "top_p", "top_k", "seed", "stop",
          "logprobs", "top_logprobs", "echo", "logit_bias", "tools", "tool_choice", "response_format", "min_tokens",
          "stop_token_ids", "presence_penalty", "repetition_penalty", "tokens", "stream_options", "suffix"]
# Mostly-valid bodies with a few fields replaced by anything: they get deep into the handlers.
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
                                 "content": st.text(max_size=30) | json_values})
near_valid = st.fixed_dictionaries(
    {"messages": st.lists(message, min_size=1, max_size=3), "prompt": st.text(max_size=30) | json_values,
     "max_tokens": st.integers(1, 4), "stream": st.booleans()},
    optional={name: json_values for name in FIELDS if name not in ("messages", "prompt", "max_tokens", "stream")})


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(ENDPOINTS), body=json_values)
def test_random_json_never_breaks_the_server(base_url, endpoint, body):
    check(*send(base_url + endpoint, json.dumps(body).encode()))


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(ENDPOINTS[:2]), body=near_valid)
def test_nearly_valid_requests_never_break_the_server(base_url, endpoint, body):
    check(*send(base_url + endpoint, json.dumps(body).encode()))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(endpoint=st.sampled_from(ENDPOINTS), raw=st.binary(max_size=200))
def test_malformed_bytes_are_a_400(base_url, endpoint, raw):
    status, body = send(base_url + endpoint, raw)
    check(status, body)
