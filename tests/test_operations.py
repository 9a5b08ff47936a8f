"""Running aserve for real users: metrics, request ids, API keys, CORS, backpressure and
input limits, over raw HTTP against the real app on the tiny random-weight Llama."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from openapi_schema import assert_valid
from prometheus_client.parser import text_string_to_metric_families
from test_api import HELLO, Server, chat, post, serve, slow_engine

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "sk-test-1234"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_llama_dir) -> AsyncIterator[Server]:
    async with serve(tiny_llama_dir, max_messages=3, max_prompt_chars=200) as s:
        yield s


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def keyed(tiny_llama_dir) -> AsyncIterator[Server]:
    async with serve(tiny_llama_dir, api_key=KEY, cors_allowed_origins="https://chat.example") as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def scrape(client: aiohttp.ClientSession, server: Server, headers: dict | None = None) -> dict[str, float]:
    async with client.get(server.url + "/metrics", headers=headers or {}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {f"{s.name}{sorted(s.labels.items())}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict[str, float], name: str, **labels: str) -> float:
    wanted = [f"{k}={v}" for k, v in labels.items()]
    hits = [v for k, v in samples.items() if k.startswith(name + "[") and all(
        f"('{w.split('=')[0]}', '{w.split('=')[1]}')" in k for w in wanted)]
    return sum(hits)


# ------------------------------------------------------------------ metrics


async def test_metrics_count_tokens_requests_and_latencies(server, client):
    before = await scrape(client, server)
    body = await chat(client, server, messages=HELLO, max_tokens=5, temperature=0, ignore_eos=True)
    after = await scrape(client, server)
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
    assert delta("aserve:generation_tokens_total") == 5
    assert delta("aserve:prompt_tokens_total") == body["usage"]["prompt_tokens"]
    assert delta("aserve:request_success_total", finished_reason="length") == 1
    assert delta("aserve:time_to_first_token_seconds_count") == 1
    assert delta("aserve:inter_token_latency_seconds_count") == 4
    assert delta("aserve:e2e_request_latency_seconds_count") == 1
    assert delta("aserve:request_queue_time_seconds_count") == 1
    assert delta("aserve:engine_step_seconds_count") >= 5
    assert delta("aserve:engine_step_batch_size_sum") >= 5


async def test_metrics_show_the_engine_state(tiny_llama_dir, client, monkeypatch):
    async with serve(tiny_llama_dir) as s:
        slow_engine(s.state, monkeypatch, 0.02)
        body = {"messages": HELLO, "max_tokens": 40, "ignore_eos": True}
        requests = [asyncio.create_task(post(client, s.url, body)) for _ in range(6)]  # 4 slots: 2 wait
        await until(lambda: s.state.engine.stats()["running"] == 4 and s.state.engine.stats()["waiting"] == 2)
        busy = await scrape(client, s)
        await asyncio.gather(*requests)
        idle = await scrape(client, s)
    assert [value(busy, name) for name in STATE_GAUGES[:2]] == [4, 2]
    total, free = (value(busy, "aserve:kv_cache_blocks", state=state) for state in ("total", "free"))
    assert free < total and value(busy, STATE_GAUGES[2]) == pytest.approx((total - free) / total)
    assert [value(idle, name) for name in STATE_GAUGES] == [0, 0, 0]
    assert value(idle, "aserve:kv_cache_blocks", state="free") == total


STATE_GAUGES = ["aserve:num_requests_running", "aserve:num_requests_waiting", "aserve:kv_cache_usage_perc"]


async def test_vllms_metric_names_carry_the_same_values(server, client):
    await chat(client, server, messages=HELLO, max_tokens=3, temperature=0, ignore_eos=True)
    samples = await scrape(client, server)
    names = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_queries_total",
             "prefix_cache_hits_total", "generation_tokens_total", "prompt_tokens_total",
             "time_to_first_token_seconds_count", "request_success_total"]
    for name in names:
        assert value(samples, f"vllm:{name}") == value(samples, f"aserve:{name}"), name
    assert value(samples, "vllm:generation_tokens_total") >= 3 and value(samples, "vllm:prefix_cache_queries_total") > 0


async def test_metrics_count_errors_by_type(server, client):
    before = await scrape(client, server)
    await post(client, server.url, {"messages": []})
    await post(client, server.url, {"messages": HELLO, "model": "nope"})
    after = await scrape(client, server)
    for status in ("400", "404"):
        kind = {"error_type": "invalid_request_error", "status": status}
        assert value(after, "aserve:request_errors_total", **kind) - value(before, "aserve:request_errors_total",
                                                                          **kind) == 1


# ------------------------------------------------------------------ request ids


async def test_a_request_id_is_made_and_returned(server, client):
    reply = await post(client, server.url, {"messages": HELLO, "max_tokens": 1})
    assert len(reply.headers["X-Request-Id"]) == 32


async def test_an_incoming_request_id_is_honoured_on_streams_and_errors(server, client):
    headers = {"X-Request-Id": "trace-abc.123"}
    async with client.post(server.url + "/v1/chat/completions", headers=headers,
                           json={"messages": HELLO, "max_tokens": 2, "stream": True}) as resp:
        await resp.read()
        assert resp.headers["X-Request-Id"] == "trace-abc.123"
    reply = await post(client, server.url, {"messages": []}, headers=headers)
    assert reply.status == 400 and reply.headers["X-Request-Id"] == "trace-abc.123"


async def test_an_unsafe_request_id_is_replaced(server, client):
    reply = await post(client, server.url, {"messages": HELLO, "max_tokens": 1}, headers={"X-Request-Id": "a b\tc"})
    assert reply.headers["X-Request-Id"] != "a b\tc" and len(reply.headers["X-Request-Id"]) == 32


# ------------------------------------------------------------------ API key


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {KEY}", KEY, f"Bearer {KEY}x"])
async def test_a_missing_or_wrong_key_is_401(keyed, client, authorization):
    headers = {"Authorization": authorization} if authorization else {}
    for path, body in (("/v1/chat/completions", {"messages": HELLO}), ("/v1/completions", {"prompt": "x"}),
                       ("/tokenize", {"prompt": "x"})):
        reply = await post(client, keyed.url, body, path=path, headers=headers)
        assert reply.status == 401, (path, reply.body)
        assert_valid("ErrorResponse", reply.body)
        assert reply.body["error"]["code"] == "invalid_api_key"
    reply = await post(client, keyed.url, None, path="/v1/models", method="GET", headers=headers)
    assert reply.status == 401


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])  # the scheme is case-insensitive (RFC 9110)
async def test_the_right_key_is_let_in_and_health_and_metrics_stay_open(keyed, client, scheme):
    auth = {"Authorization": f"{scheme} {KEY}"}
    reply = await post(client, keyed.url, {"messages": HELLO, "max_tokens": 1}, headers=auth)
    assert reply.status == 200 and reply.body["usage"]["completion_tokens"] == 1
    health = await post(client, keyed.url, None, path="/health", method="GET")
    assert health.status == 200 and health.body["status"] == "ok"
    assert value(await scrape(client, keyed), "aserve:request_success_total") >= 1  # that reply, counted


async def test_metrics_can_require_the_key(tiny_llama_dir, client):
    async with serve(tiny_llama_dir, api_key=KEY, metrics_require_api_key=True) as s:
        refused = await post(client, s.url, None, path="/metrics", method="GET")
        assert refused.status == 401 and refused.body["error"]["code"] == "invalid_api_key"
        samples = await scrape(client, s, {"Authorization": f"Bearer {KEY}"})
        assert value(samples, "aserve:request_errors_total", code="invalid_api_key") == 1  # the refusal itself


async def test_the_key_can_come_from_the_environment(tiny_llama_dir, client, monkeypatch):
    monkeypatch.setenv("ASERVE_API_KEY", "from-env")
    async with serve(tiny_llama_dir) as s:
        refused = await post(client, s.url, {"messages": HELLO, "max_tokens": 1})
        assert refused.status == 401 and refused.body["error"]["code"] == "invalid_api_key"
        reply = await post(client, s.url, {"messages": HELLO, "max_tokens": 1},
                           headers={"Authorization": "Bearer from-env"})
        assert reply.status == 200 and reply.body["choices"][0]["message"]["role"] == "assistant"


# ------------------------------------------------------------------ CORS


async def test_cors_preflight_is_answered_for_an_allowed_origin(keyed, client):
    headers = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "Authorization, Content-Type"}
    async with client.options(keyed.url + "/v1/chat/completions", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "https://chat.example"
        assert "AUTHORIZATION" in resp.headers["Access-Control-Allow-Headers"].upper()


async def test_cors_refuses_other_origins(keyed, client):
    headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with client.options(keyed.url + "/v1/chat/completions", headers=headers) as resp:
        assert resp.status == 403
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_headers_on_an_allowed_request(keyed, client):
    headers = {"Origin": "https://chat.example", "Authorization": f"Bearer {KEY}"}
    reply = await post(client, keyed.url, {"messages": HELLO, "max_tokens": 1}, headers=headers)
    assert reply.headers["Access-Control-Allow-Origin"] == "https://chat.example"
    assert "X-Request-Id" in reply.headers["Access-Control-Expose-Headers"]


async def test_without_configured_origins_there_are_no_cors_headers(server, client):
    reply = await post(client, server.url, {"messages": HELLO, "max_tokens": 1},
                       headers={"Origin": "https://chat.example"})
    assert "Access-Control-Allow-Origin" not in reply.headers


# ------------------------------------------------------------------ limits and backpressure


async def test_too_many_messages_is_400(server, client):
    reply = await post(client, server.url, {"messages": HELLO * 4})
    assert reply.status == 400 and reply.body["error"]["param"] == "messages"


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 201}]}, "messages"),
    ("/v1/completions", {"prompt": ["x" * 150, "y" * 51]}, "prompt"),
])
async def test_a_prompt_over_the_character_limit_is_400(server, client, path, body, param):
    reply = await post(client, server.url, body, path=path)
    assert reply.status == 400, reply.body
    assert reply.body["error"]["code"] == "prompt_too_long" and reply.body["error"]["param"] == param


async def until(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


async def test_past_max_waiting_requests_new_ones_get_503_with_retry_after(tiny_llama_dir, client, monkeypatch):
    async with serve(tiny_llama_dir, max_waiting_requests=2) as s:
        slow_engine(s.state, monkeypatch, 0.02)
        stats = s.state.engine.stats
        body = {"messages": HELLO, "max_tokens": 30, "ignore_eos": True}
        # max_num_seqs is 4: 4 run, 2 wait, and the next is refused at once.
        accepted = [asyncio.create_task(post(client, s.url, body)) for _ in range(4)]
        await until(lambda: stats()["running"] == 4)
        accepted += [asyncio.create_task(post(client, s.url, body)) for _ in range(2)]
        await until(lambda: stats()["waiting"] == 2)
        reply = await post(client, s.url, body)
        assert reply.status == 503 and reply.headers["Retry-After"] == "1"
        assert reply.body["error"]["code"] == "server_busy"
        assert_valid("ErrorResponse", reply.body)
        assert [r.status for r in await asyncio.gather(*accepted)] == [200] * 6
        assert s.state.in_flight == 0


async def test_one_json_log_line_per_request(tiny_llama_dir, client, caplog):
    import json
    import logging

    async with serve(tiny_llama_dir, log_requests_json=True) as s:
        with caplog.at_level(logging.INFO, logger="aserve.requests"):
            await post(client, s.url, {"messages": HELLO, "max_tokens": 3, "n": 2, "ignore_eos": True},
                       headers={"X-Request-Id": "log-1"})
            await post(client, s.url, {"prompt": "x", "max_tokens": 10**6}, path="/v1/completions",
                       headers={"X-Request-Id": "log-2"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "aserve.requests"]
    assert [(x["request_id"], x["status"]) for x in lines] == [("log-1", 200)]  # the 400 came before admission
    line = lines[0]
    assert line["id"].startswith("chatcmpl-") and line["model"] == s.model and line["error"] is None
    assert line["completion_tokens"] == 6 and line["finish_reasons"] == ["length", "length"]
    assert line["prompt_tokens"] > 0 and 0 < line["ttft_s"] <= line["total_s"]


async def test_a_queued_stream_gets_keep_alive_comments(tiny_llama_dir, client, monkeypatch):
    async with serve(tiny_llama_dir, sse_keepalive_seconds=0.05) as s:
        slow_engine(s.state, monkeypatch, 0.02)
        body = {"messages": HELLO, "max_tokens": 40, "ignore_eos": True}
        blockers = [asyncio.create_task(post(client, s.url, body)) for _ in range(4)]  # every slot busy ~1 s
        await until(lambda: s.state.engine.stats()["running"] == 4)
        async with client.post(s.url + "/v1/chat/completions", json={**body, "max_tokens": 2, "stream": True}) as resp:
            raw = (await resp.read()).decode()
        await asyncio.gather(*blockers)
    before_first_token = raw.split('"content":"', 2)
    assert raw.count(": keep-alive\n\n") >= 3 and ": keep-alive" in before_first_token[0] + before_first_token[1]
    events = [e for e in raw.split("\n\n") if e and not e.startswith(":")]
    assert events[-1] == "data: [DONE]"


async def test_a_request_past_its_timeout_ends_with_an_error(tiny_llama_dir, client, monkeypatch):
    import json

    async with serve(tiny_llama_dir, request_timeout_seconds=0.3) as s:
        slow_engine(s.state, monkeypatch, 0.02)
        body = {"messages": HELLO, "max_tokens": 200, "ignore_eos": True}
        reply = await post(client, s.url, body)
        assert reply.status == 504 and reply.body["error"]["code"] == "request_timeout"
        assert_valid("ErrorResponse", reply.body)
        async with client.post(s.url + "/v1/chat/completions", json={**body, "stream": True}) as resp:
            events = [e for e in (await resp.read()).decode().split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["error"]["code"] == "request_timeout"
        await until(lambda: s.state.engine.stats()["kv_blocks_free"] == s.state.engine.stats()["kv_blocks_total"])


async def test_a_draining_server_refuses_new_requests_with_503(tiny_llama_dir, client):
    async with serve(tiny_llama_dir) as s:
        s.state.draining = True
        reply = await post(client, s.url, {"messages": HELLO, "max_tokens": 1})
        assert reply.status == 503 and reply.body["error"]["code"] == "shutting_down"


# ------------------------------------------------------------------ probes


async def test_a_draining_server_is_alive_but_not_ready(tiny_llama_dir, client):
    async with serve(tiny_llama_dir) as s:
        async with client.get(s.url + "/health") as ready, client.get(s.url + "/health/live") as live:
            assert (ready.status, (await ready.json())["status"]) == (200, "ok") and live.status == 200
        s.state.draining = True  # what SIGTERM sets (cli.py)
        async with client.get(s.url + "/health") as ready, client.get(s.url + "/health/live") as live:
            assert (ready.status, (await ready.json())["status"]) == (503, "draining")
            assert (live.status, (await live.json())["status"]) == (200, "alive")
        s.state.engine_task.cancel()  # the loop gone: neither
        await asyncio.sleep(0.05)
        async with client.get(s.url + "/health") as ready, client.get(s.url + "/health/live") as live:
            assert (ready.status, live.status) == (503, 503)


async def test_probes_and_load_polls_need_no_key_and_version_names_the_release(keyed, client):
    import aserve

    for path in ("/health", "/health/live", "/load", "/get_load"):
        async with client.get(keyed.url + path) as resp:
            assert resp.status == 200
    async with client.get(keyed.url + "/version", headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert (await resp.json()) == {"version": aserve.__version__}


async def test_load_counts_the_sequences_in_the_engine_as_vllm_and_vllm_router_read_it(tiny_llama_dir, client,
                                                                                       monkeypatch):
    async with serve(tiny_llama_dir) as s:
        async with client.get(s.url + "/load") as vllm, client.get(s.url + "/get_load") as router:
            assert (await vllm.json(), await router.json()) == ({"server_load": 0}, {"load": 0})
        slow_engine(s.state, monkeypatch, 0.02)
        body = {"messages": HELLO, "ignore_eos": True, "max_tokens": 100, "n": 3, "stream": True}
        async with client.post(s.url + "/v1/chat/completions", json=body) as running:
            await running.content.readuntil(b"\n\n")  # under way: its three choices are sequences
            async with client.get(s.url + "/load") as vllm, client.get(s.url + "/get_load") as router:
                assert (await vllm.json(), await router.json()) == ({"server_load": 3}, {"load": 3})


async def test_the_chat_page_is_also_served_at_chat_where_routers_pass_it_through(keyed, client):
    async with client.get(keyed.url + "/chat") as page, client.get(keyed.url + "/") as root:
        assert page.status == 200 and page.content_type == "text/html"
        assert await page.read() == await root.read()


# ------------------------------------------------------------------ exposure


@pytest.mark.parametrize(("host", "status"), [
    ("evil.example", 403), ("evil.example:8000", 403), ("127.0.0.1:8000", 200), ("localhost", 200),
    ("[::1]:8000", 200), ("my.lan:8000", 200),  # my.lan: given with --allowed-hosts
])
async def test_a_loopback_server_answers_only_loopback_or_allowed_hosts(tiny_llama_dir, client, host, status):
    async with serve(tiny_llama_dir, allowed_hosts="my.lan") as s:
        async with client.get(s.url + "/v1/models", headers={"Host": host}) as resp:
            assert resp.status == status
            if status == 403:
                body = await resp.json()
                assert body["error"]["code"] == "host_not_allowed" and "--allowed-hosts" in body["error"]["message"]


async def test_https_with_a_self_signed_certificate(tiny_llama_dir, tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate can be made")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    trust = ssl.create_default_context(cafile=str(cert))
    async with serve(tiny_llama_dir, ssl_keyfile=str(key), ssl_certfile=str(cert)) as s:
        assert s.url.startswith("https://")
        async with aiohttp.ClientSession() as session:
            async with session.get(s.url + "/health", ssl=trust) as resp:
                assert resp.status == 200
            with pytest.raises(aiohttp.ClientConnectorCertificateError):  # a client that does not trust it
                await session.get(s.url + "/health")
