"""The chat page at GET /, in a real headless Chromium (Debian's, driven by Playwright) against
aserve on the tiny random-weight Llama: streaming, Stop, multi-turn history, errors, escaping,
API keys and phone width; Markdown and code rendered safely, conversations kept in the browser,
regenerate and edit, honest speed figures, reasoning, adapters, keyboard."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web
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


async def answer_started(page) -> None:
    await page.wait_for_function("(document.querySelector('.msg.assistant .text') || {}).textContent > ''")


async def last_answer(page) -> str:
    """The last answer's text as the model wrote it (the page shows it rendered as Markdown)."""
    return await page.locator(".msg.assistant .text").last.get_attribute("data-raw")


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
    await answer_started(page)
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
    await answer_started(page)
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
    from types import SimpleNamespace

    from test_cluster import cluster_of
    from tiny_models import build_tiny_model

    model = build_tiny_model(tmp_path / "model", max_positions=4096)
    with cluster_of(model, tmp_path, "round_robin", replicas=2) as cluster:
        bodies = chat_request_bodies(page)
        await open_chat(page, SimpleNamespace(url=cluster.url), max_tokens=8, path="/chat")
        await ask(page, "Hello there")
        stats = await wait_finished(page)
        await ask(page, "And again")
        await wait_finished(page, 2)
    assert "finish: length" in stats and await last_answer(page)
    assert len(bodies) == 2 and bodies[1]["messages"][-1] == {"role": "user", "content": "And again"}


# ---------------------------------------------------------------------------- Markdown, safely


def _stream_body(model: str, deltas: list[dict], usage: dict | None = None) -> str:
    chunks = [{"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        chunks.append({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [],
                       "usage": usage})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


async def test_markdown_and_code_render_while_the_answer_streams(server, page, monkeypatch):
    text = "Here is **bold** text.\n\n```python\nprint('hello')\n```\n\nAnd `inline` code, then more words to come."
    with scripted_output(server, text):
        slow_engine(server.state, monkeypatch, 0.05)
        await open_chat(page, server, max_tokens=200)
        await ask(page, "Show me code")
        seen_bold_while_streaming = seen_code_while_streaming = False
        while not await page.locator(".msg.assistant .stats").last.text_content():  # filled in at the end
            seen_bold_while_streaming |= await page.locator(".msg.assistant strong").count() > 0
            seen_code_while_streaming |= await page.locator(".msg.assistant .code pre code").count() > 0
            await asyncio.sleep(0.03)
    assert seen_bold_while_streaming and seen_code_while_streaming
    assert await page.locator(".msg.assistant strong").text_content() == "bold"
    block = page.locator(".msg.assistant .code")
    assert await block.locator(".lang").text_content() == "python"
    assert await block.locator("pre code").text_content() == "print('hello')\n"
    assert await block.locator("button.copy-code").count() == 1
    assert await page.locator(".msg.assistant p code").text_content() == "inline"
    assert await last_answer(page) == text


XSS = ('<script>window.pwned = 1</script> <img src=x onerror="window.pwned = 2"> '
       '<iframe src="javascript:window.pwned = 3"></iframe> <b onmouseover="window.pwned = 4">hover</b>\n\n'
       '[a link](javascript:window.pwned=5) [data](data:text/html;base64,PHNjcmlwdD4=) '
       '<a href="javascript:window.pwned=6">raw link</a> ![remote](http://example.invalid/x.png) '
       '[fine](https://example.invalid/page)\n\n```html\n<script>window.pwned = 7</script>\n```')


@pytest.mark.parametrize("raw", [False, True], ids=["markdown", "raw-text"])
async def test_html_and_dangerous_markdown_in_an_answer_create_no_dangerous_element(server, page, raw):
    body = _stream_body(server.model, [{"role": "assistant", "content": ""}, {"content": XSS}])
    await page.route("**/v1/chat/completions",
                     lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    await open_chat(page, server)
    if raw:
        await page.check("#raw")
    await ask(page, "Say something")
    await wait_finished(page)
    messages = page.locator("#messages")
    assert await messages.locator("script, img, iframe, object, embed, style").count() == 0
    assert await messages.locator("[onerror], [onmouseover], [onclick], [style]").count() == 0
    assert await messages.locator("a[href^='javascript'], a[href^='data'], a[href^='JAVASCRIPT']").count() == 0
    assert await page.evaluate("window.pwned") is None
    assert await last_answer(page) == XSS
    shown = await messages.locator(".msg.assistant .text").last.text_content()
    assert "<script>window.pwned = 1</script>" in shown  # raw HTML is shown as text, as written
    if not raw:
        assert await messages.locator("a[href='https://example.invalid/page'][rel~='noopener']").count() == 1


# ---------------------------------------------------------------------------- conversations


async def test_a_conversation_and_the_settings_survive_a_reload_and_it_can_be_renamed_and_deleted(server, page):
    await open_chat(page, server, max_tokens=5)
    await page.fill("#system", "Be brief.")
    await ask(page, "Remember me")
    await wait_finished(page)
    answer = await last_answer(page)
    await page.reload()
    await page.wait_for_function("document.querySelector('#model').options.length > 0")
    assert await page.locator(".msg.user .text").text_content() == "Remember me"
    assert await last_answer(page) == answer
    assert await page.input_value("#system") == "Be brief." and await page.input_value("#max-tokens") == "5"
    assert await page.locator(".chat-item").count() == 1
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept("Kept chat")))
    await page.click(".rename-chat")
    await page.wait_for_function("document.querySelector('.open-chat').textContent === 'Kept chat'")
    await page.reload()
    assert await page.locator(".open-chat").text_content() == "Kept chat"
    await page.click(".delete-chat")
    assert await page.locator(".chat-item").count() == 0 and await page.locator(".msg").count() == 0
    await page.reload()
    assert await page.locator(".chat-item").count() == 0 and await page.locator(".msg").count() == 0


async def test_new_chat_keeps_the_old_one_in_the_list_to_reopen(server, page):
    await open_chat(page, server, max_tokens=3)
    await ask(page, "First chat")
    await wait_finished(page)
    await page.click("#new-chat")
    await ask(page, "Second chat")
    await wait_finished(page)
    assert await page.locator(".chat-item").count() == 2
    await page.click(".open-chat >> text=First chat")
    assert await page.locator(".msg.user .text").all_text_contents() == ["First chat"]


async def test_regenerate_replaces_the_last_answer_with_one_new_request_on_the_same_history(server, page):
    bodies = chat_request_bodies(page)
    await open_chat(page, server, max_tokens=6)
    await page.fill("#temperature", "1")
    await ask(page, "Tell me something")
    await wait_finished(page)
    await page.click(".regenerate")
    await page.wait_for_function("document.querySelectorAll('.msg.assistant .stats').length === 1 && "
                                 "!document.querySelector('#send').disabled && document.querySelector('.regenerate')")
    assert len(bodies) == 2 and bodies[1]["messages"] == bodies[0]["messages"] == [
        {"role": "user", "content": "Tell me something"}]
    assert await page.locator(".msg.assistant").count() == 1 and await page.locator(".msg.user").count() == 1


async def test_editing_an_earlier_turn_truncates_the_history_sent(server, page):
    bodies = chat_request_bodies(page)
    await open_chat(page, server, max_tokens=4)
    await ask(page, "First question")
    await wait_finished(page)
    await ask(page, "Second question")
    await wait_finished(page, 2)
    await page.locator(".msg.user .edit").first.click()
    assert await page.input_value("#prompt") == "First question" and await page.locator("#editing").is_visible()
    await page.fill("#prompt", "A better first question")
    await page.press("#prompt", "Enter")
    await page.wait_for_function("document.querySelectorAll('.msg.assistant').length === 1 && "
                                 "document.querySelector('.msg.assistant .stats').textContent")
    assert bodies[-1]["messages"] == [{"role": "user", "content": "A better first question"}]
    assert await page.locator(".msg.user .text").all_text_contents() == ["A better first question"]


async def test_escape_stops_the_answer(server, page, monkeypatch):
    slow_engine(server.state, monkeypatch, 0.03)
    await open_chat(page, server, max_tokens=200)
    await ask(page, "A long story")
    await answer_started(page)
    await page.keyboard.press("Escape")
    assert "finish: stopped" in await wait_finished(page)


# ---------------------------------------------------------------------------- figures, reasoning, models


async def _fake_server(handler) -> tuple[web.AppRunner, str]:
    """The page's own files beside a chat endpoint the test scripts (timings included)."""
    from aserve.server.page import add_page_routes

    app = web.Application()
    app.router.add_get("/v1/models", lambda r: web.json_response({"object": "list", "data": [
        {"id": "fake", "object": "model", "created": 0, "owned_by": "test"}]}))
    app.router.add_post("/v1/chat/completions", handler)
    add_page_routes(app)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


async def test_tokens_per_second_is_the_decode_speed_without_a_late_end(page):
    async def timed_stream(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(delta=None, finish=None, usage=None):
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                     "choices": [] if usage else [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
            if usage:
                chunk["usage"] = usage
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

        await send({"role": "assistant", "content": ""})
        await asyncio.sleep(0.3)
        await send({"content": "t0 "})  # the first token
        for i in range(1, 21):  # 20 more over 1.0 s: 20 tok/s of decode
            await asyncio.sleep(0.05)
            await send({"content": f"t{i} "})
        await asyncio.sleep(1.0)  # a finish and usage that come late must not lower it
        await send(finish="stop")
        await send(usage={"prompt_tokens": 5, "completion_tokens": 21, "total_tokens": 26})
        await resp.write(b"data: [DONE]\n\n")
        return resp

    runner, url = await _fake_server(timed_stream)
    try:
        await page.goto(url + "/")
        await page.wait_for_function("document.querySelector('#model').options.length > 0")
        await ask(page, "Go")
        stats = await wait_finished(page)
    finally:
        await runner.cleanup()
    rate = float(re.search(r"([\d.]+) tok/s", stats)[1])
    assert 18 <= rate <= 21, stats  # 20 tokens over 1.0 s (timers add a little), not ~10 over 2 s
    assert "21 tokens" in stats and int(re.search(r"TTFT (\d+) ms", stats)[1]) >= 300


async def test_reasoning_shows_in_a_collapsed_thinking_block_above_the_answer(server, page):
    body = _stream_body(server.model, [{"role": "assistant", "content": ""}, {"reasoning_content": "Let me think. "},
                                       {"reasoning_content": "Two plus two."}, {"content": "It is **4**."}])
    await page.route("**/v1/chat/completions",
                     lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    await open_chat(page, server)
    await ask(page, "What is 2+2?")
    await wait_finished(page)
    thinking = page.locator(".msg.assistant details.thinking")
    assert await thinking.count() == 1 and await thinking.get_attribute("open") is None
    assert await thinking.locator(".reasoning").text_content() == "Let me think. Two plus two."
    assert await last_answer(page) == "It is **4**."
    assert await page.locator(".msg.assistant .text strong").text_content() == "4"
    await page.reload()  # kept with the conversation
    assert await page.locator(".msg.assistant details.thinking .reasoning").text_content() == "Let me think. Two plus two."


async def test_adapters_are_listed_under_their_base_model(server, page):
    models = {"object": "list", "data": [
        {"id": "sql-lora", "object": "model", "created": 0, "owned_by": "aserve", "parent": "base-model"},
        {"id": "base-model", "object": "model", "created": 0, "owned_by": "aserve", "parent": None},
        {"id": "chat-lora", "object": "model", "created": 0, "owned_by": "aserve", "parent": "base-model"}]}
    await page.route("**/v1/models", lambda route: route.fulfill(status=200, content_type="application/json",
                                                                   body=json.dumps(models)))
    await page.goto(server.url + "/")
    await page.wait_for_function("document.querySelector('#model').options.length === 3")
    options = await page.locator("#model option").evaluate_all("os => os.map(o => [o.value, o.textContent.trim()])")
    assert options == [["base-model", "base-model"], ["sql-lora", "↳ sql-lora"], ["chat-lora", "↳ chat-lora"]]


async def test_the_page_follows_the_systems_dark_mode(server, browser):
    colours = []
    for scheme in ("light", "dark"):
        context = await browser.new_context(color_scheme=scheme)
        page = await context.new_page()
        try:
            await page.goto(server.url + "/")
            colours.append(await page.evaluate("getComputedStyle(document.body).backgroundColor"))
        finally:
            await context.close()
    assert colours == ["rgb(246, 246, 248)", "rgb(22, 23, 26)"]
