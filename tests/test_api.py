"""The HTTP API, end to end: the real app in-process on tiny random-weight models, spoken to
over raw HTTP with aiohttp, every response checked against the official OpenAI schemas.

Two servers are started once for the module:
- `server`: the tiny random-weight Llama (byte-level BPE, ChatML template), max_model_len 256.
- `cjk_server`: the same model with its weights rewritten into a deterministic bigram machine
  that, after the prompt's last token ("\\n"), spells "你👋é" over and over one *byte token* at a
  time, so every character of its output is split across 2-4 tokens (lessons-from-peers item 1).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from openapi_schema import assert_valid
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from aserve.config import load_config
from aserve.launch import build_state
from aserve.server.app import create_app, server_ssl_context, start_server
from aserve.server.serving import ServingState

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 4
MAX_BODY_BYTES = 64 * 1024
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello there, how are you today?"}]


# ---------------------------------------------------------------------------- servers


@dataclass
class Server:
    url: str
    state: ServingState

    @property
    def model(self) -> str:
        return self.state.model_name


@asynccontextmanager
async def serve(model_dir: Path, model_settings: dict[str, Any] | None = None,
                engine_settings: dict[str, Any] | None = None, **server_settings: Any) -> AsyncIterator[Server]:
    # Built exactly as the CLI builds it (aserve/cli.py -> launch.build_state -> app). float32, not
    # auto: auto is bfloat16 on some CPUs only, and bfloat16 logits move with the batch's shape.
    config = load_config(None, {
        "model": {"path": str(model_dir), "max_model_len": MAX_MODEL_LEN, "dtype": "float32", **(model_settings or {})},
        # 4 MiB: 512 blocks of 16 positions of the tiny models (512 bytes a position).
        "engine": {"max_num_seqs": MAX_NUM_SEQS, "max_num_batched_tokens": 64, "kv_cache_memory": "4MiB",
                   **(engine_settings or {})},
        "server": {"max_body_bytes": MAX_BODY_BYTES, **server_settings},
    })
    state = build_state(config)
    app = create_app(state)
    tls = server_ssl_context(state.settings)
    runner = await start_server(app, "127.0.0.1", 0, ssl_context=tls)
    try:
        yield Server(f"{'https' if tls else 'http'}://127.0.0.1:{runner.addresses[0][1]}", state)
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_llama_dir) -> AsyncIterator[Server]:
    async with serve(tiny_llama_dir) as s:
        yield s


CJK_CYCLE = "你👋é"  # 3 + 4 + 2 UTF-8 bytes: 9 byte tokens per cycle


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's bytes_to_unicode: the character a byte-level BPE vocab spells byte b with."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


BYTE_CHAR = _byte_level_alphabet()
CHAR_BYTE = {c: b for b, c in BYTE_CHAR.items()}


def build_cjk_model(src: Path, dst: Path) -> Path:
    """Copies the tiny Llama and rewrites its weights: attention and MLP outputs are zeroed, so
    the final hidden state is the current token's embedding alone; the chain tokens ("\\n" and
    the byte tokens of CJK_CYCLE) get orthogonal embeddings, and lm_head maps each one to the
    next byte of the cycle with a logit of 40 (every other token: 0). Greedy or sampled at
    temperature 1, the output is CJK_CYCLE repeated, one byte token per step, never EOS."""
    shutil.copytree(src, dst)
    vocab = Tokenizer.from_file(str(dst / "tokenizer.json")).get_vocab()
    chain = [vocab[BYTE_CHAR[b]] for b in b"\n" + CJK_CYCLE.encode()]
    assert len(set(chain)) == len(chain), "the chain's byte tokens must be distinct"
    weights = load_file(str(dst / "model.safetensors"))
    for name, w in weights.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            w.zero_()
    weights["model.norm.weight"].fill_(1.0)
    embed, lm_head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    lm_head.zero_()
    for i, token in enumerate(chain):
        embed[token].zero_()
        embed[token, i] = 1.0
        following = chain[i + 1] if i + 1 < len(chain) else chain[1]  # the cycle skips the "\n"
        lm_head[following, i] = 5.0  # the normed one-hot is 8 at dim i: logit 40
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cjk_server(tiny_llama_dir, tmp_path_factory) -> AsyncIterator[Server]:
    model_dir = build_cjk_model(tiny_llama_dir, tmp_path_factory.mktemp("cjk") / "tiny_cjk")
    async with serve(model_dir) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


def slow_engine(state: ServingState, monkeypatch, seconds_per_step: float) -> None:
    """Makes every engine step take at least `seconds_per_step`, so timing-dependent tests
    (disconnects, queueing) have a wide margin: the tiny model decodes a token in ~0.5 ms."""
    runner = state.engine.runner
    run = runner.run

    def slow_run(scheduled):
        time.sleep(seconds_per_step)
        return run(scheduled)

    monkeypatch.setattr(runner, "run", slow_run)


# ---------------------------------------------------------------------------- HTTP helpers


@dataclass
class Reply:
    status: int
    headers: Any
    body: Any  # parsed JSON, or the raw text when it is not JSON


@dataclass
class Stream:
    headers: Any
    chunks: list[dict] = field(default_factory=list)  # the JSON events, [DONE] excluded

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in self.chunks if c["choices"])

    @property
    def contents(self) -> list[str]:
        """The content of every chunk that has some, in order."""
        return [c["choices"][0]["delta"]["content"] for c in self.chunks
                if c["choices"] and c["choices"][0]["delta"].get("content")]

    @property
    def finish_reason(self) -> str:
        (reason,) = [c["choices"][0]["finish_reason"] for c in self.chunks
                     if c["choices"] and c["choices"][0]["finish_reason"] is not None]
        return reason


async def post(client: aiohttp.ClientSession, url: str, body: Any, path: str = CHAT, method: str = "POST",
               **kwargs) -> Reply:
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    headers.update(kwargs.pop("headers", None) or {})
    async with client.request(method, url + path, data=data, headers=headers, **kwargs) as resp:
        raw = await resp.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode("utf-8", "replace")
        return Reply(resp.status, resp.headers, parsed)


async def chat(client: aiohttp.ClientSession, server: Server, **body) -> dict:
    """A non-stream request that must succeed; returns the validated chat.completion."""
    reply = await post(client, server.url, {"model": server.model, **body})
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    assert_valid("CreateChatCompletionResponse", reply.body)
    return reply.body


def parse_sse(raw: bytes) -> list[str]:
    """The data of each event, checking OpenAI's exact framing: `data: <payload>\\n\\n` only,
    ending with `data: [DONE]\\n\\n`."""
    text = raw.decode("utf-8")  # strict: a stream must be valid UTF-8
    assert text.endswith("data: [DONE]\n\n"), f"the stream does not end with [DONE]: {text[-200:]!r}"
    events = text.split("\n\n")
    assert events.pop() == ""
    for event in events:
        assert event.startswith("data: ") and "\n" not in event, f"badly framed event: {event!r}"
    data = [event[len("data: "):] for event in events]
    assert data.count("[DONE]") == 1
    return data


async def stream(client: aiohttp.ClientSession, server: Server, **body) -> Stream:
    """A stream request that must succeed; every chunk is validated against the spec."""
    async with client.post(server.url + CHAT, json={"model": server.model, "stream": True, **body}) as resp:
        raw = await resp.read()
        assert resp.status == 200, raw
        result = Stream(resp.headers)
    assert result.headers["Content-Type"] == "text/event-stream"
    for data in parse_sse(raw)[:-1]:
        chunk = json.loads(data)
        assert "error" not in chunk, chunk
        assert_valid("CreateChatCompletionStreamResponse", chunk)
        result.chunks.append(chunk)
    assert result.chunks, "no chunks before [DONE]"
    return result


def counts(usage: dict) -> dict:
    """Usage without prompt_tokens_details: a repeated prompt finds its blocks cached the second time."""
    return {key: usage[key] for key in ("prompt_tokens", "completion_tokens", "total_tokens")}


def text_of(completion: dict) -> str:
    return completion["choices"][0]["message"]["content"]


async def health(client: aiohttp.ClientSession, server: Server) -> dict:
    async with client.get(server.url + "/health") as resp:
        assert resp.status == 200
        return await resp.json()


async def poll_health(client: aiohttp.ClientSession, server: Server, until: Callable[[dict], bool], what: str,
                      timeout: float = 2.0) -> dict:
    """Polls /health until `until(stats)`; fails with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not until(stats := await health(client, server)):
        assert time.monotonic() < deadline, f"{what} after {timeout}s: {stats}"
        await asyncio.sleep(0.01)
    return stats


async def wait_until_idle(client: aiohttp.ClientSession, server: Server, timeout: float = 2.0) -> dict:
    """Polls /health until no request runs or waits and every KV slot is free."""
    return await poll_health(
        client, server,
        lambda st: st["running"] == 0 and st["waiting"] == 0 and st["kv_blocks_free"] == st["kv_blocks_total"],
        "the engine is still busy", timeout)


# ---------------------------------------------------------------------------- non-stream


async def test_non_stream_chat_returns_a_valid_completion_with_consistent_usage(server, client):
    body = await chat(client, server, messages=HELLO, max_tokens=5, temperature=0)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == server.model
    assert abs(body["created"] - time.time()) < 60
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    # The random tiny model practically never emits EOS, so max_tokens is what ends it.
    assert choice["finish_reason"] == "length"
    expected_prompt = len(server.state.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True,
                                                                     tokenize=True, return_dict=False))
    assert body["usage"] == {"prompt_tokens": expected_prompt, "completion_tokens": 5,
                             "total_tokens": expected_prompt + 5, "prompt_tokens_details": {"cached_tokens": 0}}


async def test_only_requests_with_the_same_cache_salt_share_cached_prompt_blocks(server, client):
    messages = [{"role": "user", "content": "salted " * 40}]  # several full blocks

    async def cached(**salt) -> int:
        body = await chat(client, server, messages=messages, max_tokens=1, temperature=0, **salt)
        return body["usage"]["prompt_tokens_details"]["cached_tokens"]

    assert await cached(cache_salt="tenant-a") == 0
    assert await cached(cache_salt="tenant-b") == 0  # the same prompt, another salt: nothing shared
    assert await cached() == 0  # no salt is a salt of its own
    assert await cached(cache_salt="tenant-a") > 0


async def test_an_empty_cache_salt_is_a_400(server, client):
    reply = await post(client, server.url, {"messages": HELLO, "cache_salt": ""})
    assert reply.status == 400
    assert reply.body["error"]["param"] == "cache_salt"


# ---------------------------------------------------------------------------- streaming


async def test_stream_chunks_validate_and_follow_the_chunk_protocol(server, client):
    s = await stream(client, server, messages=HELLO, max_tokens=8, temperature=0)
    assert s.headers["Content-Type"] == "text/event-stream"
    assert s.headers["Cache-Control"] == "no-cache"
    assert s.headers["X-Accel-Buffering"] == "no"
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in s.chunks}) == 1
    assert s.chunks[0]["id"].startswith("chatcmpl-") and s.chunks[0]["model"] == server.model
    assert s.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in s.chunks[1:])
    finishing = [i for i, c in enumerate(s.chunks) if c["choices"][0]["finish_reason"] is not None]
    with_content = [i for i, c in enumerate(s.chunks) if c["choices"][0]["delta"].get("content")]
    assert len(finishing) == 1
    assert with_content and finishing[0] > with_content[-1]
    assert finishing[0] == len(s.chunks) - 1  # without include_usage, the finish chunk is the last
    assert s.finish_reason == "length"
    # Only the role chunk may carry an empty content; no empty deltas after it.
    assert all(c["choices"][0]["delta"].get("content") != "" for c in s.chunks[1:])


async def test_stream_with_include_usage_ends_with_one_usage_chunk(server, client):
    s = await stream(client, server, messages=HELLO, max_tokens=7, temperature=0,
                     stream_options={"include_usage": True})
    *body_chunks, last = s.chunks
    assert all("usage" in c and c["usage"] is None for c in body_chunks)
    assert all(len(c["choices"]) == 1 for c in body_chunks)
    assert last["choices"] == []
    reference = await chat(client, server, messages=HELLO, max_tokens=7, temperature=0)
    assert last["usage"] == reference["usage"]
    assert last["usage"]["completion_tokens"] == 7
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 7
    assert body_chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("stream_options", [None, {"include_usage": False}, {}], ids=["absent", "false", "empty"])
async def test_stream_without_include_usage_has_no_usage_field(server, client, stream_options):
    extra = {} if stream_options is None else {"stream_options": stream_options}
    s = await stream(client, server, messages=HELLO, max_tokens=4, temperature=0, **extra)
    assert all("usage" not in c for c in s.chunks)
    assert all(len(c["choices"]) == 1 for c in s.chunks)


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1, "seed": 1234},
                                      {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 7}],
                         ids=["greedy", "seeded", "seeded-truncated"])
async def test_streamed_text_equals_non_stream_text(server, client, sampling):
    messages = [{"role": "user", "content": "Mixed: hello 你好 👋 world 世界 🌍. Tell me a story."}]
    whole = await chat(client, server, messages=messages, max_tokens=64, **sampling)
    s = await stream(client, server, messages=messages, max_tokens=64, stream_options={"include_usage": True},
                     **sampling)
    assert s.text == text_of(whole)
    assert s.finish_reason == whole["choices"][0]["finish_reason"]
    assert counts(s.chunks[-1]["usage"]) == counts(whole["usage"])  # the second one found its prompt cached


def _split_characters(text: str, vocab: dict[str, int]) -> set[str]:
    """The non-ASCII characters of `text` that no single vocab token holds whole: a model can
    only have produced them as two or more byte-level tokens."""
    token_bytes = [bytes(CHAR_BYTE[c] for c in token) for token in vocab if all(c in CHAR_BYTE for c in token)]
    return {ch for ch in set(text) if not ch.isascii() and ch != "\ufffd"
            and not any(ch.encode() in t for t in token_bytes)}


async def test_stream_of_random_multibyte_output_matches_and_adds_no_replacement_chars(server, client):
    # The random model emits random byte tokens: some form valid multi-byte characters split
    # across tokens, some are invalid UTF-8, which decodes to U+FFFD in the full text too. The
    # stream must reproduce the full decode exactly: no U+FFFD of its own from a character
    # that was cut at a chunk boundary, and no character lost.
    vocab = Tokenizer.from_str(server.state.tokenizer.backend_tokenizer.to_str()).get_vocab()
    messages = [{"role": "user", "content": "你好，世界！今天天气很好。👋🌍🎉"}]
    split_seen: set[str] = set()
    for seed in range(8):
        whole = text_of(await chat(client, server, messages=messages, temperature=1, seed=seed))
        s = await stream(client, server, messages=messages, temperature=1, seed=seed)
        assert s.text == whole, f"seed {seed}"
        assert s.text.count("\ufffd") == whole.count("\ufffd")
        split_seen |= _split_characters(whole, vocab)
    # The check above must really have seen characters split over byte tokens.
    assert len(split_seen) >= 3, split_seen


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1, "seed": 5}], ids=["greedy", "seeded"])
async def test_stream_of_cjk_and_emoji_split_over_byte_tokens_has_no_replacement_char(cjk_server, client, sampling):
    cycles = 6
    expected = CJK_CYCLE * cycles
    messages = [{"role": "user", "content": "Say hello in Chinese, with an emoji."}]
    n = len(CJK_CYCLE.encode()) * cycles  # one byte token per step
    s = await stream(client, cjk_server, messages=messages, max_tokens=n, **sampling)
    assert s.text == expected
    assert not any("\ufffd" in c for c in s.contents)
    assert len(s.contents) >= 3  # streamed piece by piece, not all at the end
    whole = await chat(client, cjk_server, messages=messages, max_tokens=n, **sampling)
    assert text_of(whole) == expected
    assert whole["usage"]["completion_tokens"] == n


async def test_output_cut_inside_a_character_drops_the_partial_character(cjk_server, client):
    # 3 cycles (27 byte tokens), then 你 (3), then 2 of 👋's 4 bytes: max_tokens ends mid-character.
    n = 9 * 3 + 3 + 2
    s = await stream(client, cjk_server, messages=HELLO, max_tokens=n, temperature=0,
                     stream_options={"include_usage": True})
    whole = await chat(client, cjk_server, messages=HELLO, max_tokens=n, temperature=0)
    for text in (s.text, text_of(whole)):
        assert text == CJK_CYCLE * 3 + "你"
    assert s.finish_reason == whole["choices"][0]["finish_reason"] == "length"
    assert s.chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"] == n


# ---------------------------------------------------------------------------- stop strings


def _stop_across_boundary(contents: list[str]) -> str:
    """A stop string of plain printable text whose first occurrence in the output starts in one
    streamed chunk and ends in the next (chunk boundaries are token boundaries)."""
    full, position = "".join(contents), 0
    for left, right in zip(contents, contents[1:]):
        position += len(left)
        candidate = left[-3:] + right[:3]
        if len(left) >= 2 and len(right) >= 2 and candidate.isprintable() and candidate.strip() \
                and "\ufffd" not in candidate and full.find(candidate) == position - len(left[-3:]):
            return candidate
    raise AssertionError(f"no usable token boundary in {contents!r}")


@pytest.mark.parametrize("as_list", [False, True], ids=["string", "list"])
async def test_stop_string_across_tokens_is_cut_and_never_emitted(server, client, as_list):
    messages = [{"role": "user", "content": "Once upon a time, there was a little robot."}]
    greedy = await stream(client, server, messages=messages, max_tokens=40, temperature=0)
    assert greedy.finish_reason == "length"
    full = greedy.text
    stop = _stop_across_boundary(greedy.contents)
    expected = full[: full.index(stop)]
    stop_param = ["never-in-the-output-@@", stop] if as_list else stop

    whole = await chat(client, server, messages=messages, max_tokens=40, temperature=0, stop=stop_param)
    assert text_of(whole) == expected
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] < 40

    s = await stream(client, server, messages=messages, max_tokens=40, temperature=0, stop=stop_param)
    assert s.text == expected
    assert stop not in s.text
    assert not any(stop in c for c in s.contents)
    assert s.finish_reason == "stop"
    assert all(c["choices"][0]["delta"].get("content") != "" for c in s.chunks[1:])  # no empty deltas


async def test_earliest_stop_string_wins(server, client):
    messages = [{"role": "user", "content": "Once upon a time, there was a little robot."}]
    full = text_of(await chat(client, server, messages=messages, max_tokens=40, temperature=0))
    clean = [i for i in range(4, len(full) - 4) if full[i:i + 3].isprintable() and "\ufffd" not in full[i:i + 3]
             and full[i:i + 3].strip()]
    early, late = full[clean[0]:clean[0] + 3], full[clean[-1]:clean[-1] + 3]
    whole = await chat(client, server, messages=messages, max_tokens=40, temperature=0, stop=[late, early])
    assert text_of(whole) == full[: min(full.index(early), full.index(late))]
    assert whole["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(("stop", "expected"), [
    ("👋", "你"),  # a stop string that is one character, made of 4 byte tokens
    ("é你", "你👋"),  # across a character boundary, 5 byte tokens
    (["👋é你👋", "é"], "你👋"),  # the one that completes first wins
    ("你", ""),  # matches at once: an empty answer
], ids=["emoji", "two-chars", "list", "immediate"])
async def test_stop_string_made_of_byte_tokens(cjk_server, client, stop, expected):
    whole = await chat(client, cjk_server, messages=HELLO, max_tokens=40, temperature=0, stop=stop)
    assert text_of(whole) == expected
    assert whole["choices"][0]["finish_reason"] == "stop"
    s = await stream(client, cjk_server, messages=HELLO, max_tokens=40, temperature=0, stop=stop)
    assert s.text == expected
    assert s.finish_reason == "stop"
    assert all(c["choices"][0]["delta"].get("content") != "" for c in s.chunks[1:])  # no empty deltas


# ---------------------------------------------------------------------------- context length


async def test_prompt_plus_max_tokens_beyond_context_is_context_length_exceeded(server, client):
    prompt = (await chat(client, server, messages=HELLO, max_tokens=1))["usage"]["prompt_tokens"]
    room = MAX_MODEL_LEN - prompt
    ok = await chat(client, server, messages=HELLO, max_tokens=room, temperature=0)  # exactly fits
    assert ok["usage"]["total_tokens"] <= MAX_MODEL_LEN
    for stream_flag in (False, True):
        reply = await post(client, server.url, {"messages": HELLO, "max_tokens": room + 1, "stream": stream_flag})
        assert reply.status == 400, reply.body
        assert reply.headers["Content-Type"].startswith("application/json")
        assert_valid("ErrorResponse", reply.body)
        error = reply.body["error"]
        assert error["code"] == "context_length_exceeded"
        assert error["type"] == "invalid_request_error"
        assert str(MAX_MODEL_LEN) in error["message"]
        assert str(prompt + room + 1) in error["message"]


async def test_prompt_alone_beyond_context_is_context_length_exceeded(server, client):
    long_messages = [{"role": "user", "content": "hello " * 400}]
    reply = await post(client, server.url, {"messages": long_messages})
    assert reply.status == 400
    assert_valid("ErrorResponse", reply.body)
    assert reply.body["error"]["code"] == "context_length_exceeded"
    assert str(MAX_MODEL_LEN) in reply.body["error"]["message"]


async def test_omitted_max_tokens_fills_the_rest_of_the_context(cjk_server, client):
    # The CJK model never emits EOS, so only the context limit can end it.
    body = await chat(client, cjk_server, messages=HELLO, temperature=0)
    assert body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"] == MAX_MODEL_LEN
    s = await stream(client, cjk_server, messages=HELLO, temperature=0, stream_options={"include_usage": True})
    assert s.chunks[-1]["usage"] == usage
    assert s.text == text_of(body)


# ---------------------------------------------------------------------------- bad input


def _big_body() -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "x" * (MAX_BODY_BYTES + 1024)}]}).encode()


# (id, method, path, body, status, code, param): body is bytes (sent as is) or a dict (JSON).
BAD_REQUESTS: list[tuple[str, str, str, Any, int, str | None, str | None]] = [
    ("malformed-json", "POST", CHAT, b'{"messages": [', 400, "invalid_json", None),
    ("body-a-list", "POST", CHAT, b"[1, 2]", 400, None, None),
    ("body-a-string", "POST", CHAT, b'"hello"', 400, None, None),
    ("body-null", "POST", CHAT, b"null", 400, None, None),
    ("empty-body", "POST", CHAT, b"", 400, None, None),
    ("temperature-a-string", "POST", CHAT, {"messages": HELLO, "temperature": "hot"}, 400, None, "temperature"),
    ("max-tokens-a-string", "POST", CHAT, {"messages": HELLO, "max_tokens": "5"}, 400, None, "max_tokens"),
    ("messages-a-string", "POST", CHAT, {"messages": "hello"}, 400, None, "messages"),
    ("messages-missing", "POST", CHAT, {"model": "x-unused"}, 400, None, "messages"),
    ("messages-empty", "POST", CHAT, {"messages": []}, 400, None, "messages"),
    ("message-not-an-object", "POST", CHAT, {"messages": ["hi"]}, 400, None, None),
    ("message-without-role", "POST", CHAT, {"messages": [{"content": "hi"}]}, 400, None, None),
    ("unknown-role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None,
     "messages[0].role"),
    ("temperature-negative", "POST", CHAT, {"messages": HELLO, "temperature": -0.5}, 400, None, "temperature"),
    ("top-p-zero", "POST", CHAT, {"messages": HELLO, "top_p": 0}, 400, None, "top_p"),
    ("top-p-above-one", "POST", CHAT, {"messages": HELLO, "top_p": 1.5}, 400, None, "top_p"),
    ("max-tokens-zero", "POST", CHAT, {"messages": HELLO, "max_tokens": 0}, 400, None, "max_tokens"),
    ("five-stop-strings", "POST", CHAT, {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, None, "stop"),
    ("unknown-model", "POST", CHAT, {"model": "gpt-17", "messages": HELLO}, 404, "model_not_found", "model"),
    ("image-content-part", "POST", CHAT,
     {"messages": [{"role": "user", "content": [
         {"type": "text", "text": "what is this?"},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]},
     400, None, "messages[0].content[1].type"),
    ("text-part-without-text", "POST", CHAT, {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     400, None, None),
    ("stop-not-strings", "POST", CHAT, {"messages": HELLO, "stop": ["ok", 1]}, 400, None, "stop[1]"),
    ("content-part-not-an-object", "POST", CHAT,
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, "x"]}]},
     400, None, "messages[0].content[1]"),
    ("n-too-many", "POST", CHAT, {"messages": HELLO, "n": 17}, 400, None, "n"),
    ("continue-a-user-message", "POST", CHAT, {"messages": HELLO, "add_generation_prompt": False,
                                               "continue_final_message": True}, 400, None, "continue_final_message"),
    ("stream-a-string", "POST", CHAT, {"messages": HELLO, "stream": "yes"}, 400, None, "stream"),
    ("stream-options-a-string", "POST", CHAT, {"messages": HELLO, "stream": True, "stream_options": "usage"},
     400, None, "stream_options"),
    ("body-too-large", "POST", CHAT, _big_body(), 413, None, None),
    ("unknown-route", "POST", "/v1/nothing-here", {"messages": HELLO}, 404, None, None),
    ("unknown-model-card", "GET", "/v1/models/gpt-17", None, 404, "model_not_found", None),
    ("wrong-method", "GET", CHAT, None, 405, None, None),
]


def _bad_cases(streaming: bool) -> list:
    cases = []
    for case_id, method, path, body, status, code, param in BAD_REQUESTS:
        if streaming:
            if not isinstance(body, dict):
                continue
            body = {"stream": True, "stream_options": {"include_usage": True}, **body}
        cases.append(pytest.param(method, path, body, status, code, param, id=case_id))
    return cases


def _check_error(reply: Reply, status: int, code: str | None, param: str | None) -> None:
    assert reply.status == status, reply.body
    assert reply.headers["Content-Type"].startswith("application/json"), reply.headers
    assert_valid("ErrorResponse", reply.body)
    error = reply.body["error"]
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    if status in (400, 404):
        assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("method", "path", "body", "status", "code", "param"), _bad_cases(streaming=False))
async def test_bad_request_is_an_openai_error(server, client, method, path, body, status, code, param):
    reply = await post(client, server.url, body, path=path, method=method)
    _check_error(reply, status, code, param)


@pytest.mark.parametrize(("method", "path", "body", "status", "code", "param"), _bad_cases(streaming=True))
async def test_bad_streaming_request_is_a_json_error_not_a_stream(server, client, method, path, body, status,
                                                                  code, param):
    reply = await post(client, server.url, body, path=path, method=method)
    assert "text/event-stream" not in reply.headers.get("Content-Type", "")
    _check_error(reply, status, code, param)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
@pytest.mark.parametrize("path", [CHAT, "/v1/completions", "/tokenize"])
async def test_a_body_not_declared_json_is_a_415_and_nothing_runs(server, client, content_type, path):
    # What a page on another site can POST without a CORS preflight.
    body = json.dumps({"model": server.model, "messages": HELLO, "prompt": "hi"}).encode()
    headers = {"Content-Type": content_type} if content_type else {}
    steps = server.state.engine.steps
    async with client.post(server.url + path, data=body, headers=headers) as resp:
        reply = Reply(resp.status, resp.headers, await resp.json())
    _check_error(reply, 415, "unsupported_media_type", None)
    assert "application/json" in reply.body["error"]["message"]
    assert server.state.engine.steps == steps


async def test_json_with_a_charset_is_json(server, client):
    body = json.dumps({"model": server.model, "messages": HELLO, "max_tokens": 2}).encode()
    async with client.post(server.url + CHAT, data=body,
                           headers={"Content-Type": "application/json; charset=utf-8"}) as resp:
        assert resp.status == 200


async def test_wrong_method_names_the_allowed_method(server, client):
    reply = await post(client, server.url, None, method="GET")
    assert reply.status == 405
    assert reply.headers["Allow"] == "POST"


async def test_too_large_body_error_names_the_limit(server, client):
    reply = await post(client, server.url, _big_body())
    assert reply.status == 413
    assert reply.body["error"]["code"] == "request_too_large"
    assert str(MAX_BODY_BYTES) in reply.body["error"]["message"]


async def test_server_keeps_serving_after_a_burst_of_bad_requests(server, client):
    bad = [post(client, server.url, body, path=path, method=method)
           for _, method, path, body, status, _, _ in BAD_REQUESTS]
    bad += [post(client, server.url, {"stream": True, **body}) for _, _, path, body, _, _, _ in BAD_REQUESTS
            if isinstance(body, dict) and path == CHAT]
    replies = await asyncio.gather(*bad)
    assert all(400 <= r.status < 500 for r in replies), [r.status for r in replies]
    body = await chat(client, server, messages=HELLO, max_tokens=3, temperature=0)
    assert body["usage"]["completion_tokens"] == 3
    s = await stream(client, server, messages=HELLO, max_tokens=3, temperature=0)
    assert s.finish_reason == "length"
    stats = await wait_until_idle(client, server)
    assert stats["status"] == "ok"


async def test_engine_failure_is_an_openai_error_and_the_server_recovers(server, client, monkeypatch):
    def broken_run(scheduled):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(server.state.engine.runner, "run", broken_run)
    reply = await post(client, server.url, {"messages": HELLO, "max_tokens": 3})
    assert reply.status == 500
    assert_valid("ErrorResponse", reply.body)
    assert reply.body["error"]["type"] == "server_error"
    assert "simulated device failure" in reply.body["error"]["message"]
    # A stream that fails before its first token has sent nothing yet: the same HTTP error, which a
    # router in front could retry elsewhere (tests/test_faults.py has the error event mid-stream).
    async with client.post(server.url + CHAT, json={"messages": HELLO, "max_tokens": 3, "stream": True}) as resp:
        assert resp.status == 500 and resp.content_type == "application/json"
        error = await resp.json()
    assert_valid("ErrorResponse", error)
    assert "simulated device failure" in error["error"]["message"]
    monkeypatch.undo()
    await wait_until_idle(client, server)
    body = await chat(client, server, messages=HELLO, max_tokens=3, temperature=0)
    assert body["usage"]["completion_tokens"] == 3


async def test_unexpected_error_mid_stream_still_ends_the_stream(server, client, monkeypatch):
    from aserve.engine.detokenizer import IncrementalDetokenizer

    real_push, calls = IncrementalDetokenizer.push, []

    def failing_push(self, token_ids):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("detokenizer bug")
        return real_push(self, token_ids)

    monkeypatch.setattr(IncrementalDetokenizer, "push", failing_push)
    body = {"messages": HELLO, "max_tokens": 20, "temperature": 0, "stream": True}
    async with client.post(server.url + CHAT, json=body, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200
        data = parse_sse(await resp.read())
    assert data[-1] == "[DONE]"
    assert_valid("ErrorResponse", json.loads(data[-2]))
    await wait_until_idle(client, server)


async def test_a_vanishingly_small_temperature_is_greedy(server, client):
    greedy = await chat(client, server, messages=HELLO, max_tokens=8, temperature=0)
    tiny = await chat(client, server, messages=HELLO, max_tokens=8, temperature=1e-40)
    assert text_of(tiny) == text_of(greedy) != ""


# ---------------------------------------------------------------------------- liberal input


async def test_unknown_fields_are_ignored(server, client):
    plain = await chat(client, server, messages=HELLO, max_tokens=6, temperature=0)
    extra = await chat(client, server, messages=[{**HELLO[0], "x_vendor_field": 1}], max_tokens=6, temperature=0,
                       frequency_penalty=0, presence_penalty=0, user="someone", metadata={"k": "v"},
                       x_unknown={"nested": [1, 2]}, service_tier="auto", store=False, logprobs=False)
    assert text_of(extra) == text_of(plain)
    assert extra["usage"] == plain["usage"]


NULL_OPTIONALS = dict.fromkeys([
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "n", "seed", "stream",
    "stream_options", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "user",
    "tools", "tool_choice", "response_format", "metadata", "service_tier",
])


async def test_null_optional_fields_mean_unset(cjk_server, client):
    # LangChain and other SDK wrappers send every optional field, null when unset. The CJK
    # model never stops by itself, so an unset max_tokens must mean "the rest of the context".
    messages = [{**HELLO[0], "name": None}]
    body = await chat(client, cjk_server, messages=messages, **NULL_OPTIONALS)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == MAX_MODEL_LEN
    s = await stream(client, cjk_server, messages=messages, **{**NULL_OPTIONALS, "stream": True})
    assert s.text == text_of(body)
    assert all("usage" not in c for c in s.chunks)  # stream_options null: no usage


@pytest.mark.parametrize("max_field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_and_max_completion_tokens_both_limit_the_output(server, client, max_field):
    body = await chat(client, server, messages=HELLO, temperature=0, **{max_field: 3})
    assert body["usage"]["completion_tokens"] == 3


async def test_max_completion_tokens_takes_precedence_over_max_tokens(server, client):
    body = await chat(client, server, messages=HELLO, temperature=0, max_tokens=9, max_completion_tokens=2)
    assert body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("stop", ["@@never@@", ["@@never@@"], ["@@a@@", "@@b@@", "@@c@@", "@@d@@"], []],
                         ids=["string", "list", "four", "empty-list"])
async def test_stop_accepts_a_string_or_a_list(server, client, stop):
    plain = await chat(client, server, messages=HELLO, max_tokens=6, temperature=0)
    body = await chat(client, server, messages=HELLO, max_tokens=6, temperature=0, stop=stop)
    assert text_of(body) == text_of(plain)
    assert body["choices"][0]["finish_reason"] == "length"


async def test_content_as_a_list_of_text_parts(server, client):
    parts = [{"type": "text", "text": "Hello there,"}, {"type": "text", "text": "how are you today?"}]
    as_parts = await chat(client, server, messages=[{"role": "user", "content": parts}], max_tokens=4, temperature=0)
    as_text = await chat(client, server, messages=[{"role": "user", "content": "Hello there,\nhow are you today?"}],
                         max_tokens=4, temperature=0)
    assert counts(as_parts["usage"]) == counts(as_text["usage"])
    assert text_of(as_parts) == text_of(as_text)


async def test_multi_turn_conversation_with_system_user_assistant(server, client):
    turns = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
        {"role": "user", "content": "And of Japan?"},
    ]
    body = await chat(client, server, messages=turns, max_tokens=4, temperature=0)
    expected = len(server.state.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                                              return_dict=False))
    assert body["usage"]["prompt_tokens"] == expected
    single = await chat(client, server, messages=turns[-1:], max_tokens=1)
    assert body["usage"]["prompt_tokens"] > single["usage"]["prompt_tokens"]


async def test_developer_role_is_accepted_as_system(server, client):
    def convo(role: str) -> list[dict]:
        return [{"role": role, "content": "Answer briefly."}, *HELLO]

    as_developer = await chat(client, server, messages=convo("developer"), max_tokens=5, temperature=0)
    as_system = await chat(client, server, messages=convo("system"), max_tokens=5, temperature=0)
    assert counts(as_developer["usage"]) == counts(as_system["usage"])
    assert text_of(as_developer) == text_of(as_system)


async def test_model_may_be_omitted(server, client):
    reply = await post(client, server.url, {"messages": HELLO, "max_tokens": 2})
    assert reply.status == 200, reply.body
    assert reply.body["model"] == server.model


# ---------------------------------------------------------------------------- models, health


async def test_models_list_validates_and_names_the_served_model(server, client, tiny_llama_dir):
    async with client.get(server.url + "/v1/models") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert_valid("ListModelsResponse", body)
    assert [m["id"] for m in body["data"]] == [server.model] == [Path(tiny_llama_dir).name]
    async with client.get(f"{server.url}/v1/models/{server.model}") as resp:
        assert resp.status == 200
        card = await resp.json()
    assert_valid("Model", card)
    assert card["id"] == server.model


async def test_served_model_name_with_a_slash(tiny_llama_dir, client):
    async with serve(tiny_llama_dir, served_model_name="org/tiny-model") as named:
        for path in ("/v1/models/org/tiny-model", "/v1/models/org%2Ftiny-model"):
            reply = await post(client, named.url, None, path=path, method="GET")
            assert reply.status == 200, (path, reply.body)
            assert_valid("Model", reply.body)
            assert reply.body["id"] == "org/tiny-model"
        reply = await post(client, named.url, None, path="/v1/models/org/other", method="GET")
        assert reply.status == 404 and reply.body["error"]["code"] == "model_not_found"
        body = await chat(client, named, messages=HELLO, max_tokens=2)
        assert body["model"] == "org/tiny-model"


async def test_health_reports_ok_and_engine_counters(server, client):
    await wait_until_idle(client, server)
    before = await health(client, server)
    assert before["status"] == "ok" and (before["kv_blocks_total"], before["kv_block_size"]) == (512, 16)
    messages = [{"role": "user", "content": "Counting the counters: " + "abc " * 5}]  # new to the cache
    first = await chat(client, server, messages=messages, max_tokens=5, temperature=0, ignore_eos=True)
    await wait_until_idle(client, server)
    middle = await health(client, server)
    second = await chat(client, server, messages=messages, max_tokens=5, temperature=0, ignore_eos=True)
    await wait_until_idle(client, server)
    after = await health(client, server)
    prompt = first["usage"]["prompt_tokens"]
    assert (middle["running"], middle["waiting"], middle["kv_blocks_free"]) == (0, 0, 512)
    assert middle["steps"] - before["steps"] == 5  # one prefill that samples, four decodes
    assert middle["prefix_cache_queries"] - before["prefix_cache_queries"] == prompt
    assert middle["prefix_cache_hits"] == before["prefix_cache_hits"]
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and cached == (prompt - 1) // 16 * 16 and after["prefix_cache_hits"] - middle["prefix_cache_hits"] == cached
    assert after["kv_blocks_cached"] >= prompt // 16
    assert after["prefix_cache_hit_rate"] == round(after["prefix_cache_hits"] / after["prefix_cache_queries"], 4)


# ---------------------------------------------------------------------------- disconnects, load


# These use the CJK model: it never emits EOS, so without max_tokens a request runs until the
# context is full (~240 steps, > 2 s with the slowed engine), and a request that stopped early
# can only have been aborted.


async def test_client_disconnecting_mid_stream_aborts_its_request(cjk_server, client, monkeypatch):
    slow_engine(cjk_server.state, monkeypatch, 0.01)
    before = (await wait_until_idle(client, cjk_server))["steps"]
    resp = await client.post(cjk_server.url + CHAT, json={"messages": HELLO, "stream": True})
    assert resp.status == 200
    events = 0
    async for line in resp.content:
        events += line.startswith(b"data: ")
        if events == 3:  # the role chunk and two content chunks
            break
    resp.close()  # drops the connection, as a client that goes away does
    stats = await wait_until_idle(client, cjk_server, timeout=2.0)
    assert stats["steps"] - before < 100, "the request ran on after its client left"


async def test_non_stream_client_timing_out_aborts_its_request(cjk_server, client, monkeypatch):
    slow_engine(cjk_server.state, monkeypatch, 0.01)
    before = (await wait_until_idle(client, cjk_server))["steps"]
    with pytest.raises(asyncio.TimeoutError):
        await post(client, cjk_server.url, {"messages": HELLO}, timeout=aiohttp.ClientTimeout(total=0.3))
    stats = await wait_until_idle(client, cjk_server, timeout=5.0)
    assert stats["steps"] - before < 100, "the request ran on after its client left"


async def test_a_cancellation_that_lands_as_an_output_arrives_still_ends_the_request():
    """The handler of a client that left is cancelled: even when that happens in the same loop
    iteration as an output arriving, the merged stream ends and closes its engine stream (which
    aborts the request). asyncio.wait_for on Python 3.11 swallowed exactly this cancellation."""
    from aserve.server.generation import _merge

    arrived, closed = asyncio.Event(), asyncio.Event()

    async def stream():
        try:
            while True:
                await arrived.wait()
                arrived.clear()
                yield "token"
        finally:
            closed.set()

    async def handler():
        async for _ in _merge([stream()], heartbeat=5.0):
            pass

    task = asyncio.create_task(handler())
    await asyncio.sleep(0.01)  # the handler waits for the first output
    arrived.set()
    await asyncio.sleep(0)  # the stream's pump takes it and queues it for the handler...
    task.cancel()  # ...and the client leaves in the same iteration
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2.0)
    assert closed.is_set()


async def test_client_leaving_while_queued_is_dropped_from_the_queue(cjk_server, client, monkeypatch):
    slow_engine(cjk_server.state, monkeypatch, 0.01)
    await wait_until_idle(client, cjk_server)
    # Fill every KV slot with a stream that runs for > 2 s.
    holders = [await client.post(cjk_server.url + CHAT, json={"messages": HELLO, "stream": True})
               for _ in range(MAX_NUM_SEQS)]
    queued = None
    try:
        assert all(resp.status == 200 for resp in holders)
        await poll_health(client, cjk_server, lambda st: st["running"] == MAX_NUM_SEQS, "the streams never all ran")
        queued = asyncio.create_task(post(client, cjk_server.url, {"messages": HELLO, "max_tokens": 5},
                                          timeout=aiohttp.ClientTimeout(total=0.4)))
        stats = await poll_health(client, cjk_server, lambda st: st["waiting"] == 1, "the 5th request never queued")
        assert stats["running"] == MAX_NUM_SEQS and stats["kv_blocks_free"] > 0  # waiting for a place, not memory
        with pytest.raises(asyncio.TimeoutError):
            await queued
        stats = await poll_health(client, cjk_server, lambda st: st["waiting"] == 0,
                                  "the abandoned request is still queued", timeout=1.0)
        assert stats["running"] == MAX_NUM_SEQS  # the others go on undisturbed
    finally:
        if queued is not None and not queued.done():
            queued.cancel()
        for resp in holders:
            resp.close()
    await wait_until_idle(client, cjk_server)


async def test_more_streams_than_kv_slots_all_complete(cjk_server, client, monkeypatch):
    # The CJK model's output is known exactly, so each stream can be checked in full even
    # though they are batched together in every combination the scheduler picks.
    slow_engine(cjk_server.state, monkeypatch, 0.003)
    seen: list[dict] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            seen.append(await health(client, cjk_server))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    n = 2 * len(CJK_CYCLE.encode())
    streams = await asyncio.gather(*(
        stream(client, cjk_server, messages=[{"role": "user", "content": f"Request number {i}"}], max_tokens=n,
               temperature=i % 2, seed=i, stream_options={"include_usage": True})
        for i in range(10)))
    done.set()
    await watcher
    for s in streams:
        assert s.text == CJK_CYCLE * 2
        assert s.finish_reason == "length"
        assert s.chunks[-1]["usage"]["completion_tokens"] == n
    assert len({s.chunks[0]["id"] for s in streams}) == 10
    assert max(st["running"] for st in seen) <= MAX_NUM_SEQS
    assert max(st["waiting"] for st in seen) > 0, "the burst never queued: the test did not exercise waiting"
    await wait_until_idle(client, cjk_server)


async def test_health_answers_while_an_engine_step_runs(server, client, monkeypatch):
    # Each step blocks its thread for 300 ms, like a long prefill on a big model. The step
    # runs on the worker thread, so the event loop keeps answering meanwhile.
    slow_engine(server.state, monkeypatch, 0.3)
    body = {"messages": HELLO, "max_tokens": 4, "temperature": 0, "stream": True}
    generation = asyncio.create_task(client.post(server.url + CHAT, json=body))
    await poll_health(client, server, lambda h: h["running"] == 1, "the request to start")
    latencies = []
    for _ in range(10):
        start = time.perf_counter()
        assert (await health(client, server))["status"] == "ok"
        latencies.append(time.perf_counter() - start)
    assert max(latencies) < 0.05, latencies
    resp = await generation
    assert parse_sse(await resp.read())[-1] == "[DONE]"
    resp.release()
