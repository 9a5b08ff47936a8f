"""Faults and vanishing clients, over real HTTP on the tiny random-weight Llama: a client that
stops reading, a thousand clients that drop at random moments, a step that fails for one
request, and an engine loop that dies. In each case no other request is lost, no client
waits forever, and every KV slot comes back."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from openapi_schema import assert_valid
from test_api import HELLO, Server, parse_sse, post, serve, slow_engine, stream, wait_until_idle
from test_operations import scrape, until, value

from aserve.server.sse import SSEWriter

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Top logprobs make every chunk ~1.5 KB, so a few dozen tokens fill the socket buffers.
BIG_CHUNKS = {"messages": HELLO, "max_tokens": 480, "n": 4, "ignore_eos": True, "stream": True,
              "logprobs": True, "top_logprobs": 20}


@pytest_asyncio.fixture(loop_scope="module")
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def _port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


async def _raw_request(server: Server, body: dict, rcvbuf: int | None = None,
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Sends a chat request on a socket of our own; `rcvbuf`: a small receive buffer, and a
    reader that buffers little, for a client that stops reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", _port(server)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
    data = json.dumps(body).encode()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    await writer.drain()
    return reader, writer


def small_send_buffers(monkeypatch) -> None:
    """Streams go out through 4 KiB kernel send buffers: Linux grows a loopback socket's
    buffers to megabytes, which would take the tiny model's whole output before anything
    waits on the client."""
    start = SSEWriter.start

    async def start_small(self: SSEWriter) -> None:
        self._request.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        await start(self)

    monkeypatch.setattr(SSEWriter, "start", start_small)


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    data = b""
    async with asyncio.timeout(20):
        while chunk := await reader.read(1 << 16):
            data += chunk
    return data


async def test_a_client_that_stops_reading_is_cut_and_the_others_stream_on(tiny_llama_dir, client, monkeypatch):
    small_send_buffers(monkeypatch)
    async with serve(tiny_llama_dir, {"max_model_len": 512}, stream_write_timeout_seconds=0.5) as s:
        reader, writer = await _raw_request(s, BIG_CHUNKS, rcvbuf=4096)
        assert await reader.readline() == b"HTTP/1.1 200 OK\r\n"
        other = await stream(client, s, messages=HELLO, max_tokens=20, ignore_eos=True)  # meanwhile
        assert other.chunks[-1]["choices"][0]["finish_reason"] == "length"
        await wait_until_idle(client, s, timeout=10)
        async with asyncio.timeout(10):
            while s.state.in_flight:  # its handler, stuck on the socket, gives up
                await asyncio.sleep(0.05)
        metrics = await scrape(client, s)
        assert value(metrics, "aserve:request_errors_total", code="client_too_slow") == 1
        cut = await _read_to_end(reader)  # what the socket held, then the end: no [DONE]
        writer.close()
        assert len(cut) > 10_000 and b"data: [DONE]" not in cut


async def test_the_engine_drops_a_stalled_client_past_max_buffered_tokens(tiny_llama_dir, client, monkeypatch):
    small_send_buffers(monkeypatch)
    async with serve(tiny_llama_dir, {"max_model_len": 512}, {"max_buffered_tokens": 8},
                     stream_write_timeout_seconds=0) as s:
        reader, writer = await _raw_request(s, BIG_CHUNKS, rcvbuf=4096)
        assert await reader.readline() == b"HTTP/1.1 200 OK\r\n"
        # Its handler waits on the socket for good (no write timeout), but the engine stops
        # generating for it once 8 tokens wait undelivered, and frees its KV slots.
        await wait_until_idle(client, s, timeout=20)
        generated = value(await scrape(client, s), "aserve:generation_tokens_total")
        assert generated < 4 * 480 / 4, f"{generated} tokens generated for a client that reads nothing"
        writer.close()  # the client leaves: its handler ends
        await until(lambda: s.state.in_flight == 0)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def _connect_and_drop(server: Server, rng: random.Random) -> str:
    """One client that leaves at a random moment; returns the moment."""
    body = {"messages": HELLO, "max_tokens": rng.choice([4, 32, 120]), "ignore_eos": True,
            "stream": rng.random() < 0.7}
    moment = rng.choice(["before the body", "at once", "after the headers", "mid-stream", "mid-stream"])
    if moment == "before the body":  # gone while the server still reads the request
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 500\r\n\r\n{")
    else:
        reader, writer = await _raw_request(server, body)
        if moment != "at once":  # "at once": queued, or in its prefill
            await reader.readline()
            if moment == "mid-stream":
                await reader.read(rng.randint(1, 3000))
                await asyncio.sleep(rng.random() * 0.02)
    if rng.random() < 0.5:  # half of them reset the connection instead of closing it
        writer.transport.abort()
    else:
        writer.close()
    return moment


async def test_a_thousand_clients_dropping_at_random_moments_leave_no_trace(tiny_llama_dir, client, monkeypatch):
    async with serve(tiny_llama_dir, max_waiting_requests=10_000) as s:
        slow_engine(s.state, monkeypatch, 0.001)  # so that drops land in prefill and mid-decode too
        rng = random.Random(1234)
        limit = asyncio.Semaphore(32)

        async def one() -> str:
            async with limit:
                return await _connect_and_drop(s, rng)

        for _ in range(100):  # warm-up: the allocator's and caches' first growth
            await one()
        await wait_until_idle(client, s, timeout=10)
        rss_before = _rss_mib()
        moments = await asyncio.gather(*(one() for _ in range(1000)))
        stats = await wait_until_idle(client, s, timeout=20)
        engine = s.state.engine
        await until(lambda: s.state.in_flight == 0 and not engine._streams and not engine._seqs)  # handlers unwound
        rss_after = _rss_mib()
        assert {m: moments.count(m) > 100 for m in set(moments)} == dict.fromkeys(set(moments), True)
        assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
        assert rss_after - rss_before < 32, f"RSS grew {rss_after - rss_before:.1f} MiB over 1,000 drops"
        # And the server still answers in full.
        done = await stream(client, s, messages=HELLO, max_tokens=5, ignore_eos=True)
        assert done.chunks[-1]["choices"][0]["finish_reason"] == "length"


def _fail_requests_with_max_tokens(max_tokens: int):
    """A model-runner fault hook: every step holding a request with this max_tokens raises."""

    def hook(scheduled, logits):
        if any(item.seq.params.max_tokens == max_tokens for item in scheduled):
            raise RuntimeError("injected fault")

    return hook


async def test_a_step_that_fails_for_one_request_fails_only_that_request(tiny_llama_dir, client):
    async with serve(tiny_llama_dir) as s:
        s.state.engine.runner.fault_hook = _fail_requests_with_max_tokens(13)
        body = {"messages": HELLO, "ignore_eos": True, "temperature": 0}
        good_stream, bad_stream, bad, good = await asyncio.gather(
            stream(client, s, **body, max_tokens=20),
            client.post(s.url + "/v1/chat/completions", json={**body, "max_tokens": 13, "stream": True}),
            post(client, s.url, {**body, "max_tokens": 13}),
            post(client, s.url, {**body, "max_tokens": 20}))
        assert good_stream.chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert good.status == 200 and good.body["usage"]["completion_tokens"] == 20
        assert bad.status == 500 and bad.body["error"]["code"] == "engine_error"
        assert "injected fault" in bad.body["error"]["message"]
        assert_valid("ErrorResponse", bad.body)
        assert bad_stream.status == 500  # failed before its first token: nothing was streamed yet
        error = await bad_stream.json()
        assert error["error"]["code"] == "engine_error"
        assert_valid("ErrorResponse", error)
        await wait_until_idle(client, s)
        metrics = await scrape(client, s)
        assert value(metrics, "aserve:request_errors_total", code="engine_error") == 2


async def test_a_scheduling_fault_fails_the_requests_in_flight_and_health_and_metrics_say_so(tiny_llama_dir, client,
                                                                                            monkeypatch):
    async with serve(tiny_llama_dir) as s:
        slow_engine(s.state, monkeypatch, 0.01)
        scheduler, real = s.state.engine.scheduler, s.state.engine.scheduler.schedule
        calls = []

        def failing_once():
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("a bug in the scheduler")
            return real()

        body = {"messages": HELLO, "ignore_eos": True, "max_tokens": 200}
        async with client.post(s.url + "/v1/chat/completions", json={**body, "stream": True}) as open_stream:
            await open_stream.content.readuntil(b"\n\n")  # under way
            monkeypatch.setattr(scheduler, "schedule", failing_once)
            events = parse_sse(await open_stream.read())
        error = json.loads(events[-2])["error"]
        assert error["code"] == "engine_error" and "a bug in the scheduler" in error["message"]
        after = await post(client, s.url, {**body, "max_tokens": 3})  # the loop stepped on
        assert after.status == 200 and after.body["usage"]["completion_tokens"] == 3
        async with client.get(s.url + "/health") as resp:
            health = await resp.json()
        assert resp.status == 200 and health["engine_faults"] == 1 and "a bug in the scheduler" in health["last_fault"]
        assert value(await scrape(client, s), "aserve:engine_faults_total", stage="step") == 1


async def test_a_grammar_that_fails_fails_only_its_request(tiny_llama_dir, client, monkeypatch):
    from aserve.engine.guided import Guide

    def broken(self, token):
        raise RuntimeError("a bug in the grammar")

    async with serve(tiny_llama_dir) as s:
        monkeypatch.setattr(Guide, "accept", broken)
        body = {"messages": HELLO, "ignore_eos": True, "max_tokens": 10, "temperature": 0}
        guided, plain = await asyncio.gather(
            post(client, s.url, {**body, "response_format": {"type": "json_object"}}), post(client, s.url, body))
        assert guided.status == 500 and "a bug in the grammar" in guided.body["error"]["message"]
        assert plain.status == 200 and plain.body["usage"]["completion_tokens"] == 10
        assert s.state.engine.faults == {"grammar": 1}


async def test_when_the_engine_loop_dies_every_client_hears_and_health_turns_503(tiny_llama_dir, client,
                                                                                monkeypatch):
    async with serve(tiny_llama_dir) as s:
        slow_engine(s.state, monkeypatch, 0.01)
        scheduler = s.state.engine.scheduler
        body = {"messages": HELLO, "ignore_eos": True, "max_tokens": 200}
        async with client.post(s.url + "/v1/chat/completions", json={**body, "stream": True}) as open_stream:
            await open_stream.content.readuntil(b"\n\n")  # the role chunk: it is running
            waiting = asyncio.create_task(post(client, s.url, body))

            def broken(*args) -> None:
                raise RuntimeError("a bug in the scheduler")

            # Scheduling fails and so does taking the requests out: no recovering from that.
            monkeypatch.setattr(scheduler, "schedule", broken)
            monkeypatch.setattr(scheduler, "remove", broken)
            events = parse_sse(await open_stream.read())
        assert json.loads(events[-2])["error"]["code"] == "engine_unavailable"
        assert (await waiting).status == 503
        async with client.get(s.url + "/health") as resp:
            assert resp.status == 503 and (await resp.json())["status"] == "unavailable"
        refused = await post(client, s.url, body)
        assert refused.status == 503 and refused.body["error"]["code"] == "engine_unavailable"


async def test_logprobs_render_while_other_prompts_are_tokenized(tiny_llama_dir, client):
    # Token text for logprobs is decoded on the event loop while the tokenize thread encodes
    # (with truncation settings, which mutate a Hugging Face tokenizer): each has its own.
    async with serve(tiny_llama_dir) as s:
        ask = {"messages": HELLO, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 5,
               "ignore_eos": True}
        want = (await post(client, s.url, ask)).body["choices"][0]["logprobs"]
        long = "many words here " * 400
        embed = {"input": [long, long[:999]], "truncate_prompt_tokens": 32}
        replies = await asyncio.gather(*(post(client, s.url, ask) for _ in range(24)),
                                       *(post(client, s.url, embed, path="/v1/embeddings") for _ in range(24)))
    assert [r.status for r in replies] == [200] * 48

    def texts(logprobs: dict) -> list:  # the decoded parts; the values move a little with the batch
        return [(e["token"], e["bytes"], [t["token"] for t in e["top_logprobs"]]) for e in logprobs["content"]]

    assert all(texts(r.body["choices"][0]["logprobs"]) == texts(want) for r in replies[:24])


async def test_token_text_decodes_with_a_tokenizer_of_each_threads_own(tiny_llama_dir):
    import threading

    from transformers import AutoTokenizer

    from aserve.server.logprobs import TokenText

    shared = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tt = TokenText(shared)
    used: list = []
    for _ in range(2):
        worker = threading.Thread(target=lambda: used.append(tt._tok))
        worker.start()
        worker.join()
    used.append(tt._tok)
    assert len({id(t) for t in used}) == 3 and all(t is not shared for t in used)
    assert tt.text(shared.encode("Hello", add_special_tokens=False)[0]) == shared.decode(
        shared.encode("Hello", add_special_tokens=False)[:1])
