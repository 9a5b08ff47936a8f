"""The chat page at GET /, in a real headless Chromium (Debian's, driven by Playwright) against
aserve on the tiny random-weight Llama: streaming, Stop, multi-turn history, errors, escaping,
API keys and phone width."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from test_api import Server, serve, slow_engine
from test_openai_fields import scripted_output

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (.ci/run installs it)"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        await browser.close()


@pytest_asyncio.fixture(loop_scope="module")
async def server(tiny_llama_dir) -> AsyncIterator[Server]:
    async with serve(tiny_llama_dir) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser):
    context = await browser.new_context()
    page = await context.new_page()
    yield page
    await context.close()


async def open_chat(page, server: Server, max_tokens: int = 40, path: str = "/") -> None:
    await page.goto(server.url + path)
    await page.wait_for_function("document.querySelector('#model').options.length > 0")
    await page.fill("#max-tokens", str(max_tokens))
    await page.fill("#temperature", "0")


async def ask(page, text: str) -> None:
    await page.fill("#prompt", text)
    await page.click("#send")


def chat_request_bodies(page) -> list[dict]:
    """The JSON body of every chat request the page sends from now on, in order."""
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    return bodies


async def last_answer(page) -> str:
    return await page.locator(".msg.assistant .text").last.text_content()


async def wait_finished(page, count: int = 1) -> str:
    """Waits until `count` answers show their stats line; returns the last one's."""
    stats = page.locator(".msg.assistant .stats")
    await page.wait_for_function(
        f"[...document.querySelectorAll('.msg.assistant .stats')].filter(s => s.textContent).length >= {count}")
    return await stats.last.text_content()


async def test_the_page_lists_the_model_and_streams_an_answer_over_several_frames(server, page, monkeypatch):
    slow_engine(server.state, monkeypatch, 0.05)  # ~2 s of answer: many frames, even on a busy machine
    await open_chat(page, server, max_tokens=40)
    assert await page.locator("#model").input_value() == server.model
    await ask(page, "Hello there")
    lengths = []
    while not await page.locator(".msg.assistant .stats").last.text_content():
        lengths.append(len(await last_answer(page)))
        await asyncio.sleep(0.05)
    stats = await wait_finished(page)
    growing = sorted(set(lengths) - {0})
    assert len(growing) >= 3, f"the answer did not grow over several frames: {lengths}"
    assert "TTFT" in stats and "tok/s" in stats and "finish: length" in stats, stats


async def test_stop_aborts_the_fetch_and_the_server_cancels_the_request(server, page, monkeypatch):
    slow_engine(server.state, monkeypatch, 0.03)
    await open_chat(page, server, max_tokens=200)
    await ask(page, "Tell me a long story")
    await page.wait_for_function("document.querySelector('.msg.assistant .text').textContent.length > 0")
    assert server.state.engine.stats()["running"] == 1
    await page.click("#stop")
    assert "finish: stopped" in await wait_finished(page)
    stats = server.state.engine.stats
    for _ in range(100):  # the disconnect reaches the engine within a step or two
        if stats()["running"] == 0 and stats()["kv_blocks_free"] == stats()["kv_blocks_total"]:
            break
        await asyncio.sleep(0.02)
    assert stats()["running"] == 0 and stats()["kv_blocks_free"] == stats()["kv_blocks_total"]
    assert server.state.in_flight == 0
    assert await page.locator("#send").is_enabled()


async def test_a_second_turn_sends_the_system_prompt_and_the_history(server, page):
    bodies = chat_request_bodies(page)
    await open_chat(page, server, max_tokens=8)
    await page.fill("#system", "Be brief.")
    await ask(page, "First question")
    await wait_finished(page)
    first_answer = await last_answer(page)
    await ask(page, "Second question")
    await wait_finished(page, 2)
    assert len(bodies) == 2
    assert bodies[1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": first_answer},
        {"role": "user", "content": "Second question"},
    ]
    assert bodies[1]["stream"] is True and bodies[1]["max_tokens"] == 8 and bodies[1]["temperature"] == 0


async def test_new_chat_during_an_answer_starts_with_an_empty_history(server, page, monkeypatch):
    slow_engine(server.state, monkeypatch, 0.03)
    bodies = chat_request_bodies(page)
    await open_chat(page, server, max_tokens=100)
    await ask(page, "An old question")
    await page.wait_for_function("document.querySelector('.msg.assistant .text').textContent.length > 0")
    await page.click("#new-chat")
    assert await page.locator(".msg").count() == 0
    await page.fill("#max-tokens", "3")
    await ask(page, "A new question")
    await wait_finished(page)
    assert bodies[-1]["messages"] == [{"role": "user", "content": "A new question"}]


async def test_a_refused_request_is_shown_as_a_readable_message(server, page):
    await open_chat(page, server, max_tokens=100_000)  # beyond the context: a 400
    await ask(page, "Hello")
    error = page.locator(".msg.error")
    await error.wait_for()
    text = await error.text_content()
    assert "refused (400)" in text and "maximum context length" in text, text
    assert await page.locator(".msg.assistant").count() == 0
    assert await page.locator("#send").is_enabled()


@pytest.mark.parametrize(("status", "body", "shown"), [
    (503, {"error": {"message": "the server is busy: 1024 requests are already waiting; retry later",
                     "type": "server_error", "param": None, "code": "server_busy"}},
     "The server is busy or shutting down (503): the server is busy"),
    (200, 'data: {"choices": [{"index": 0, "delta": {"content": "Half an ans"}, "finish_reason": null}]}\n\n',
     "The connection to the server was lost before the answer ended."),
])
async def test_a_busy_server_and_a_lost_connection_are_shown(server, page, status, body, shown):
    async def answer(route):
        if status == 200:  # a stream cut off: no finish, no [DONE]
            await route.fulfill(status=200, content_type="text/event-stream", body=body)
        else:
            await route.fulfill(status=status, content_type="application/json", body=json.dumps(body))

    await page.route("**/v1/chat/completions", answer)
    await open_chat(page, server)
    await ask(page, "Hello")
    error = page.locator(".msg.error")
    await error.wait_for()
    assert shown in await error.text_content()
    assert await page.locator("#send").is_enabled()


async def test_model_output_is_shown_as_text_never_as_html(server, page):
    output = 'Look: <img src=x onerror="window.pwned = 1"> <b>bold</b>\n你好, 世界 👋🏽 done'
    with scripted_output(server, output):
        await open_chat(page, server, max_tokens=200)
        await ask(page, "Say something")
        await wait_finished(page)
    assert await last_answer(page) == output
    assert await page.locator("#messages img, #messages b").count() == 0
    assert await page.evaluate("window.pwned") is None
    # Line breaks are kept: the text spans more than one line box.
    height = await page.locator(".msg.assistant .text").last.evaluate("e => e.getClientRects()[0].height")
    line = await page.locator(".msg.assistant .text").last.evaluate("e => parseFloat(getComputedStyle(e).lineHeight)")
    assert height >= 2 * line - 1


async def test_a_tag_that_arrives_whole_in_one_delta_is_shown_as_text(server, page):
    # The server's deltas are a token or a few; this one carries a whole tag at once.
    payload = '<img src=x onerror="window.pwned = 1"><script>window.pwned = 2</script>'
    chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": server.model,
             "choices": [{"index": 0, "delta": {"content": payload}, "finish_reason": "stop"}]}
    body = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
    await page.route("**/v1/chat/completions",
                     lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    await open_chat(page, server)
    await ask(page, "Say something")
    await wait_finished(page)
    assert await last_answer(page) == payload
    assert await page.locator("#messages img, #messages script").count() == 0
    assert await page.evaluate("window.pwned") is None


async def test_a_server_with_an_api_key_makes_the_page_ask_for_it(tiny_llama_dir, page):
    async with serve(tiny_llama_dir, api_key="sk-page-test") as s:
        await page.goto(s.url + "/")
        await page.locator("#key-panel").wait_for()
        await page.fill("#api-key", "sk-page-test")
        await page.click("#save-key")
        await page.wait_for_function("document.querySelector('#model').options.length > 0")
        await page.fill("#max-tokens", "5")
        await page.fill("#temperature", "0")
        await ask(page, "Hello")
        assert "finish: length" in await wait_finished(page)
        assert await last_answer(page)
        assert await page.locator(".msg.error").count() == 0


async def test_the_page_fits_a_phone_screen(server, browser):
    context = await browser.new_context(viewport={"width": 375, "height": 700}, is_mobile=True, has_touch=True)
    page = await context.new_page()
    try:
        await open_chat(page, server, max_tokens=30)
        await ask(page, "Hello from a phone")
        await wait_finished(page)
        width = await page.evaluate("document.documentElement.scrollWidth")
        send_box = await page.locator("#send").bounding_box()
    finally:
        await context.close()
    assert width <= 375, f"the page scrolls sideways at phone width ({width} px)"
    assert send_box["x"] + send_box["width"] <= 375


@pytest.mark.cluster
async def test_the_page_streams_through_vllm_router_at_chat(page, tmp_path):
    import socket
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    from tiny_models import build_tiny_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
    from cluster import Cluster

    ports = []
    for _ in range(4):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    model = build_tiny_model(tmp_path / "model")
    with Cluster(2, "round_robin", ports[0], ["--model", str(model)], log_dir=tmp_path, threads_per_replica=1,
                 replica_ports=ports[1:3], metrics_port=ports[3], start_timeout=180) as cluster:
        bodies = chat_request_bodies(page)
        await open_chat(page, SimpleNamespace(url=cluster.url), max_tokens=8, path="/chat")
        await ask(page, "Hello there")
        stats = await wait_finished(page)
        await ask(page, "And again")
        await wait_finished(page, 2)
    assert "finish: length" in stats and await last_answer(page)
    assert len(bodies) == 2 and bodies[1]["messages"][-1] == {"role": "user", "content": "And again"}
