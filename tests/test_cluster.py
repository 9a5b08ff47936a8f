"""Replicas behind vllm-router, as `make cluster` runs them: each replica and the router a real
process on loopback (deploy/cluster.py), the model a tiny random-weight one so that CI runs it.
bench/scale_out.py runs the same scenarios at full size on the default model."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import orjson
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from tiny_models import build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from cluster import Cluster, Replica, router, start_router  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio(loop_scope="module")]

HELLO = [{"role": "user", "content": "Hello there"}]
# Long enough that streams are still running when a replica is killed or drained.
LONG = {"messages": HELLO, "ignore_eos": True, "max_tokens": 3000, "temperature": 0}
SERVE_ARGS = ("--max-model-len", "4096", "--max-num-seqs", "16", "--kv-cache-memory", "256MiB",
              "--shutdown-timeout", "60")


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def long_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_long"), max_positions=4096)


def cluster_of(model: Path, tmp: Path, policy: str, replicas: int = 3) -> Cluster:
    """Replicas of `model` behind vllm-router, on free loopback ports (not started)."""
    port, metrics, *replica_ports = _free_ports(2 + replicas)
    return Cluster(replicas, policy, port, ["--model", str(model), *SERVE_ARGS], log_dir=tmp,
                   threads_per_replica=1, replica_ports=replica_ports, metrics_port=metrics, start_timeout=180)


@pytest.fixture(scope="module")
def shared(long_model, tmp_path_factory) -> Iterator[Cluster]:
    """A round_robin cluster for the tests that leave every replica running."""
    with cluster_of(long_model, tmp_path_factory.mktemp("cluster"), "round_robin") as cluster:
        yield cluster


@pytest.fixture
def fresh(long_model, tmp_path) -> Iterator[Cluster]:
    """A cluster of its own, for a test that kills or stops a replica."""
    with cluster_of(long_model, tmp_path, "round_robin") as cluster:
        yield cluster


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


@dataclass
class Outcome:
    """One streamed request as its client saw it."""

    status: int = 0
    events: int = 0  # data events before the end
    done: bool = False  # ended with [DONE] and no error event
    error: str | None = None


async def stream(http: aiohttp.ClientSession, url: str, body: dict, started: asyncio.Event | None = None,
                 **headers: str) -> Outcome:
    out = Outcome()
    try:
        async with http.post(url + "/v1/chat/completions", json={**body, "stream": True}, headers=headers) as resp:
            out.status = resp.status
            if resp.status != 200:
                out.error = (await resp.text())[:300]
                return out
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.strip() == b"data: [DONE]":
                    out.done = out.error is None
                    break
                event = orjson.loads(line[6:])
                if "error" in event:
                    out.error = event["error"]["message"]
                out.events += 1
                if started is not None:
                    started.set()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def complete(http: aiohttp.ClientSession, url: str, **body) -> tuple[int, dict]:
    async with http.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 8, **body}) as resp:
        return resp.status, await resp.json(content_type=None)


async def metric(http: aiohttp.ClientSession, replica: Replica, name: str) -> float:
    async with http.get(replica.url + "/metrics") as resp:
        text = await resp.text()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


async def served(http: aiohttp.ClientSession, cluster: Cluster) -> list[float]:
    """Requests each replica has finished so far."""
    return [await metric(http, r, "aserve:request_success_total") for r in cluster.replicas]


async def until(predicate, timeout: float = 20.0, every: float = 0.1) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {timeout} s")
        await asyncio.sleep(every)


# ---------------------------------------------------------------------------- one API through the router


async def test_the_openai_sdk_gets_the_same_answer_through_the_router_as_from_a_replica(shared):
    direct = openai.AsyncOpenAI(base_url=shared.replicas[0].url + "/v1", api_key="unused")
    routed = openai.AsyncOpenAI(base_url=shared.url + "/v1", api_key="unused")
    # The router rewrites bodies, adding fields of its own (ignore_eos, skip_special_tokens, ...):
    # greedy text and usage must come out the same.
    args = dict(model=(await direct.models.list()).data[0].id, messages=HELLO, max_tokens=20, temperature=0)
    want = await direct.chat.completions.create(**args)
    got = await routed.chat.completions.create(**args)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.usage.completion_tokens == want.usage.completion_tokens
    chunks = [c async for c in await routed.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True})]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    text = await routed.completions.create(model=args["model"], prompt="Once upon", max_tokens=10, temperature=0)
    assert text.choices[0].text == (await direct.completions.create(
        model=args["model"], prompt="Once upon", max_tokens=10, temperature=0)).choices[0].text


async def test_round_robin_spreads_requests_over_every_replica(shared, http):
    before = await served(http, shared)
    for _ in range(6):
        assert (await complete(http, shared.url))[0] == 200
    after = await served(http, shared)
    assert [a - b for a, b in zip(after, before)] == [2, 2, 2]


async def test_consistent_hash_keeps_a_session_on_one_replica(shared, http, tmp_path):
    port, metrics = _free_ports(2)
    hashing = router("consistent_hash", port, [r.url for r in shared.replicas], metrics, tmp_path / "router.log")
    start_router(hashing, port)
    try:
        url = f"http://127.0.0.1:{port}"
        for session in ("alice", "bob", "carol"):
            before = await served(http, shared)
            for _ in range(4):
                async with http.post(url + "/v1/chat/completions", headers={"X-Session-ID": session},
                                     json={"messages": HELLO, "max_tokens": 4}) as resp:
                    assert resp.status == 200
            after = await served(http, shared)
            assert sorted(a - b for a, b in zip(after, before)) == [0, 0, 4], session
    finally:
        hashing.signal(signal.SIGTERM)
        hashing.wait(10)


async def test_power_of_two_keeps_new_requests_off_a_replica_busy_with_other_clients(shared, http, tmp_path):
    port, metrics = _free_ports(2)
    p2 = router("power_of_two", port, [r.url for r in shared.replicas], metrics, tmp_path / "router.log")
    start_router(p2, port)
    try:
        # Clients that talk to replica 0 directly: the router sees their load only in GET /get_load.
        busy = shared.replicas[0]
        started = [asyncio.Event() for _ in range(3)]
        direct = [asyncio.create_task(stream(http, busy.url, {**LONG, "max_tokens": 4000}, e)) for e in started]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
        await asyncio.sleep(2.5)  # the router polls each replica's load every second
        before = await served(http, shared)
        for _ in range(9):  # each compares two replicas, and the busy one always loses
            assert (await complete(http, f"http://127.0.0.1:{port}"))[0] == 200
        after = await served(http, shared)
        async with http.get(busy.url + "/get_load") as resp:
            assert (await resp.json())["load"] == 3  # busy the whole time
        assert after[0] == before[0] and sum(after) - sum(before) == 9
        for task in direct:
            task.cancel()
    finally:
        p2.signal(signal.SIGTERM)
        p2.wait(10)


async def test_a_client_that_leaves_the_router_frees_the_replicas_kv(shared, http):
    generated = [await metric(http, r, "aserve:generation_tokens_total") for r in shared.replicas]
    async with http.post(shared.url + "/v1/chat/completions", json={**LONG, "stream": True}) as resp:
        await resp.content.readline()  # under way
    # The router drops its upstream connection at the replica's next chunk, which aborts the request.

    async def idle() -> bool:
        stats = []
        for r in shared.replicas:
            async with http.get(r.url + "/health") as health:
                stats.append(await health.json())
        return all(s["running"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"] for s in stats)

    await until(idle)
    spent = sum([await metric(http, r, "aserve:generation_tokens_total") for r in shared.replicas]) - sum(generated)
    assert 0 < spent < LONG["max_tokens"]  # cut short, not run to its end


# ---------------------------------------------------------------------------- faults


async def test_a_killed_replica_loses_only_the_streams_it_was_running(fresh, http):
    started = [asyncio.Event() for _ in range(12)]
    running = [asyncio.create_task(stream(http, fresh.url, LONG, e)) for e in started]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
    victim = fresh.replicas[0]
    victim.kill()  # SIGKILL: no drain
    # Requests sent after the kill: the router retries each on a live replica until its health
    # checks have taken the dead one out. None may fail.
    after = await asyncio.gather(*(stream(http, fresh.url, {**LONG, "max_tokens": 16}) for _ in range(12)))
    assert [o.done for o in after] == [True] * 12, [o.error for o in after if not o.done]
    before = await asyncio.gather(*running)
    lost = [o for o in before if not o.done]
    # round_robin gave the victim 4 of the 12; only those (each already streaming) can be lost.
    assert 1 <= len(lost) <= 4 and all(o.status == 200 and o.events > 0 for o in lost)
    # Restarted, it is put back in rotation by the router's health checks.
    fresh.restart(0)
    baseline = await metric(http, victim, "aserve:request_success_total")

    async def back() -> bool:
        assert (await complete(http, fresh.url))[0] == 200
        return await metric(http, victim, "aserve:request_success_total") > baseline

    await until(back, timeout=30, every=0.2)


async def test_a_draining_replica_finishes_its_streams_and_no_new_request_fails(fresh, http):
    started = [asyncio.Event() for _ in range(12)]
    running = [asyncio.create_task(stream(http, fresh.url, LONG, e)) for e in started]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
    draining = fresh.replicas[0]
    draining.signal(signal.SIGTERM)  # what Kubernetes sends: readiness turns 503, running requests finish
    after = await asyncio.gather(*(stream(http, fresh.url, {**LONG, "max_tokens": 16}) for _ in range(12)))
    assert [o.done for o in after] == [True] * 12, [o.error for o in after if not o.done]
    before = await asyncio.gather(*running)
    assert [o.done for o in before] == [True] * 12, [o.error for o in before if not o.done]
    assert draining.wait(60) == 0
