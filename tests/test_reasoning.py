"""Reasoning output: <think> text is reasoning_content (chat) or a thinking block (Messages),
never content, whole or streamed; tools still parse after it; chat_template_kwargs reach the
template. The server tests run the tiny Qwen3 model with a template that thinks, answering
with scripted text."""

import json
from collections.abc import AsyncIterator

import anthropic
import pytest
import pytest_asyncio

from aserve.server.reasoning import get_reasoning_parser
from openapi_schema import assert_valid
from test_api import HELLO, Server, chat, post, serve, stream
from test_openai_fields import WEATHER, scripted_output

ASYNC = pytest.mark.asyncio(loop_scope="module")  # the async tests share the module's server

# Qwen3's switch, reduced: with enable_thinking false the prompt closes an empty thinking block.
# It names the tools compactly (the tiny model's context is short).
TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
THOUGHT = "<think>\nThe user greets me.\n</think>\n\nHello!"
CALL = '<think>\nWeather: use the tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

# ---------------------------------------------------------------------------- the parsers


def _streamed(name: str, prompt_tail: str, text: str, step: int) -> tuple[str | None, str]:
    parser = get_reasoning_parser(name)
    splitter = parser.stream(prompt_tail)
    pieces = []
    for i in range(0, len(text), step):
        pieces += splitter.push(text[i:i + step])
    pieces += splitter.finish()
    reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
    return (reasoning if splitter.thought else None), "".join(t for kind, t in pieces if kind == "content")


@pytest.mark.parametrize(("name", "tail", "text", "expected"), [
    ("qwen3", "", THOUGHT, ("The user greets me.\n", "Hello!")),
    ("qwen3", "", "Hello!", (None, "Hello!")),  # no thinking (enable_thinking false)
    ("qwen3", "", "<think>\nStill thinking when cut", ("Still thinking when cut", "")),
    ("qwen3", "", "<thinking> is a tag", (None, "<thinking> is a tag")),
    ("qwen3", "<|im_start|>assistant\n<think>\n", "Opened by the prompt.\n</think>\n\nHi", ("Opened by the prompt.\n", "Hi")),
    ("deepseek_r1", "", "Reasoning without its tag.</think>Answer", ("Reasoning without its tag.", "Answer")),
    ("deepseek_r1", "", "<think>Tag written again.</think>Answer", ("Tag written again.", "Answer")),
    ("deepseek_r1", "", "All reasoning, cut off", ("All reasoning, cut off", "")),
])
def test_a_whole_output_and_its_stream_split_alike_at_any_chunking(name, tail, text, expected):
    assert get_reasoning_parser(name).parse(tail, text) == expected
    for step in (1, 2, 3, 7, len(text)):
        assert _streamed(name, tail, text, step) == expected


def test_an_unknown_reasoning_parser_names_the_known_ones():
    with pytest.raises(ValueError, match="qwen3, deepseek_r1"):
        get_reasoning_parser("o1")


# ---------------------------------------------------------------------------- through the server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_qwen3_dir, tmp_path_factory) -> AsyncIterator[Server]:
    template = tmp_path_factory.mktemp("reasoning") / "thinks.jinja"
    template.write_text(TEMPLATE)
    async with serve(tiny_qwen3_dir, {"chat_template": str(template), "max_model_len": 512},
                     reasoning_parser="qwen3") as s:
        yield s


@ASYNC
async def test_thinking_is_reasoning_content_and_never_content(server, client):
    with scripted_output(server, THOUGHT):
        body = await chat(client, server, messages=HELLO, max_tokens=100)
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == message["reasoning"] == "The user greets me.\n"
    assert message["content"] == "Hello!"


@ASYNC
async def test_streamed_thinking_arrives_as_reasoning_deltas_before_the_content(server, client):
    with scripted_output(server, THOUGHT):
        s = await stream(client, server, messages=HELLO, max_tokens=100)
    deltas = [c["choices"][0]["delta"] for c in s.chunks if c["choices"]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "The user greets me.\n"
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert s.text == "Hello!" and not any("think>" in (d.get("content") or "") for d in deltas)
    first_content = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert not any("reasoning_content" in d for d in deltas[first_content:])


@ASYNC
async def test_a_tool_call_after_the_thinking_is_parsed(server, client):
    with scripted_output(server, CALL):
        body = await chat(client, server, messages=HELLO, tools=[WEATHER], max_tokens=200)
    choice = body["choices"][0]
    assert choice["message"]["reasoning_content"] == "Weather: use the tool.\n"
    (call,) = choice["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert choice["finish_reason"] == "tool_calls" and not choice["message"]["content"]


@ASYNC
async def test_chat_template_kwargs_reach_the_template(server, client):
    off = await post(client, server.url, {"messages": HELLO, "chat_template_kwargs": {"enable_thinking": False},
                                          "return_token_strs": True}, path="/tokenize")
    on = await post(client, server.url, {"messages": HELLO}, path="/tokenize")
    prompt = (await post(client, server.url, {"tokens": off.body["tokens"]}, path="/detokenize")).body["prompt"]
    assert prompt.endswith("<think>\n\n</think>\n\n") and off.body["count"] > on.body["count"]
    with scripted_output(server, "Hello!"):
        body = await chat(client, server, messages=HELLO, max_tokens=100,
                          chat_template_kwargs={"enable_thinking": False})
    assert body["choices"][0]["message"]["content"] == "Hello!"
    assert "reasoning_content" not in body["choices"][0]["message"]


@ASYNC
async def test_chat_template_kwargs_may_not_override_the_templates_own_arguments(server, client):
    reply = await post(client, server.url, {"model": server.model, "messages": HELLO,
                                            "chat_template_kwargs": {"add_generation_prompt": False}})
    assert reply.status == 400 and reply.body["error"]["param"] == "chat_template_kwargs"


@ASYNC
async def test_without_a_reasoning_parser_thinking_stays_content(tiny_qwen3_dir, client):
    async with serve(tiny_qwen3_dir) as plain:
        with scripted_output(plain, THOUGHT):
            body = await chat(client, plain, messages=HELLO, max_tokens=100)
    assert body["choices"][0]["message"]["content"] == THOUGHT
    assert "reasoning_content" not in body["choices"][0]["message"]


@ASYNC
async def test_messages_put_the_thinking_in_a_thinking_block(server):
    async with anthropic.AsyncAnthropic(base_url=server.url, api_key="none", max_retries=0) as sdk:
        with scripted_output(server, THOUGHT):
            message = await sdk.messages.create(model=server.model, max_tokens=100,
                                                messages=[{"role": "user", "content": "Hi"}])
            async with sdk.messages.stream(model=server.model, max_tokens=100,
                                           messages=[{"role": "user", "content": "Hi"}]) as s:
                final = await s.get_final_message()
    for m in (message, final):
        thinking, text = m.content
        assert (thinking.type, thinking.thinking) == ("thinking", "The user greets me.\n")
        assert (text.type, text.text) == ("text", "Hello!")


@ASYNC
async def test_responses_put_the_thinking_in_a_reasoning_item(server, client):
    with scripted_output(server, THOUGHT):
        reply = await post(client, server.url, {"model": server.model, "input": "Hi", "max_output_tokens": 100},
                           path="/v1/responses")
        async with client.post(server.url + "/v1/responses", json={"model": server.model, "input": "Hi",
                                                                   "max_output_tokens": 100, "stream": True}) as resp:
            frames = [f for f in (await resp.text()).split("\n\n") if f]
    assert_valid("Response", reply.body)
    reasoning, message = reply.body["output"]
    assert reasoning["type"] == "reasoning" and reasoning["content"] == [
        {"type": "reasoning_text", "text": "The user greets me.\n"}]
    assert message["content"][0]["text"] == "Hello!"
    assert 0 < reply.body["usage"]["output_tokens_details"]["reasoning_tokens"] < reply.body["usage"]["output_tokens"]
    events = [json.loads(f.split("data: ", 1)[1]) for f in frames]
    for event in events:
        assert_valid("ResponseStreamEvent", event)
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == "The user greets me.\n"
    assert events[-1]["response"]["output"] == [{**reasoning, "id": events[-1]["response"]["output"][0]["id"]},
                                                {**message, "id": events[-1]["response"]["output"][1]["id"]}]
