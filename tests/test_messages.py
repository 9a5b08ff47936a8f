"""Anthropic's Messages API (/v1/messages), driven by the anthropic SDK: the same model answers
as through chat, in Anthropic's blocks, stop reasons, usage, stream events and errors."""

import json
from collections.abc import AsyncIterator

import aiohttp
import anthropic
import jsonschema
import pytest
import pytest_asyncio
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from test_api import HELLO, Server, chat, post, serve, slow_engine
from test_openai_fields import CLOCK, TEMPLATE, WEATHER, scripted_output

pytestmark = pytest.mark.asyncio(loop_scope="module")

CALL_TEXT = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"name": "get_weather", "description": "Weather in a city", "input_schema": WEATHER["function"]["parameters"]},
         {"name": "get_time", "input_schema": CLOCK["function"]["parameters"]}]
EVENT = TypeAdapter(RawMessageStreamEvent)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_llama_dir, tmp_path_factory) -> AsyncIterator[Server]:
    template = tmp_path_factory.mktemp("messages") / "tools.jinja"
    template.write_text(TEMPLATE)  # knows tools, compactly: the tiny model's context is short
    async with serve(tiny_llama_dir, {"chat_template": str(template), "max_model_len": 512}, api_key="secret") as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def sdk(server) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(base_url=server.url, api_key="secret", max_retries=0) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="module")
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer secret"}) as session:
        yield session


def _valid(body: dict) -> Message:
    """The SDK's own Message type, strictly: every field of ours has its type."""
    return Message.model_validate(body, strict=True)


async def _raw_events(server: Server, body: dict) -> list[dict]:
    """The stream's events as sent, each checked: its `event:` line names its type."""
    events = []
    async with aiohttp.ClientSession() as session, session.post(
            server.url + "/v1/messages", json={"stream": True, **body}, headers={"x-api-key": "secret"}) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
        for frame in (await resp.text()).split("\n\n"):
            if not frame:
                continue
            lines = dict(line.split(": ", 1) for line in frame.split("\n"))
            event = json.loads(lines["data"])
            assert lines["event"] == event["type"]
            if event["type"] != "ping":
                EVENT.validate_python(event)
            events.append(event)
    return events


async def test_a_message_answers_as_chat_does_in_anthropics_shape(server, sdk, client):
    # temperature is Anthropic's field, which this SDK version no longer sends by name
    message = await sdk.messages.create(model=server.model, max_tokens=8, extra_body={"temperature": 0},
                                        messages=[{"role": "user", "content": "Hello there"}])
    body = await chat(client, server, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8,
                      temperature=0)
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.model == server.model
    assert message.content[0].type == "text" and message.content[0].text == body["choices"][0]["message"]["content"]
    assert message.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[body["choices"][0]["finish_reason"]]
    usage = body["usage"]
    assert message.usage.output_tokens == usage["completion_tokens"]
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == usage["prompt_tokens"]
    assert message.usage.cache_creation_input_tokens == 0


async def test_input_tokens_leave_out_what_the_prefix_cache_served(server, sdk):
    prompt = [{"role": "user", "content": "cached " * 40}]
    await sdk.messages.create(model=server.model, max_tokens=2, messages=prompt)
    again = await sdk.messages.create(model=server.model, max_tokens=2, messages=prompt)
    assert again.usage.cache_read_input_tokens > 0
    total = again.usage.input_tokens + again.usage.cache_read_input_tokens
    assert total == (await sdk.messages.count_tokens(model=server.model, messages=prompt)).input_tokens


async def test_a_stream_carries_the_same_message_event_by_event(server, sdk):
    kwargs = {"model": server.model, "max_tokens": 12, "extra_body": {"temperature": 0},
              "messages": [{"role": "user", "content": "Tell me a story"}]}
    whole = await sdk.messages.create(**kwargs)
    async with sdk.messages.stream(**kwargs) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == whole.content[0].text
    assert [(b.type, b.text) for b in final.content] == [(b.type, b.text) for b in whole.content]
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


async def test_stream_events_come_in_anthropics_order(server):
    events = await _raw_events(server, {"model": server.model, "max_tokens": 6, "temperature": 0,
                                        "messages": [{"role": "user", "content": "Hi"}]})
    types = [e["type"] for e in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    assert types[1] == "content_block_start" and types[-3] == "content_block_stop"
    assert set(types[2:-3]) == {"content_block_delta"}
    assert events[-2]["usage"]["output_tokens"] == 6 and events[-2]["delta"]["stop_reason"] == "max_tokens"


async def test_a_system_prompt_is_the_chat_system_message(server, sdk, client):
    for system in ("Answer briefly.", [{"type": "text", "text": "Answer briefly."}]):
        message = await sdk.messages.create(model=server.model, max_tokens=6, extra_body={"temperature": 0}, system=system,
                                            messages=[{"role": "user", "content": "Hi"}])
        body = await chat(client, server, max_tokens=6, temperature=0,
                          messages=[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}])
        assert message.content[0].text == body["choices"][0]["message"]["content"]


async def test_a_stop_sequence_ends_the_message_and_is_named(server, sdk):
    kwargs = {"model": server.model, "max_tokens": 12, "extra_body": {"temperature": 0},
              "messages": [{"role": "user", "content": "Hello there"}]}
    text = (await sdk.messages.create(**kwargs)).content[0].text
    stop = text.split()[1]  # a word past the first
    message = await sdk.messages.create(**kwargs, stop_sequences=[stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert stop not in message.content[0].text and text.startswith(message.content[0].text)


async def test_count_tokens_counts_the_prompt_chat_would_send(server, sdk, client):
    counted = await sdk.messages.count_tokens(model=server.model, system="Be brief.",
                                              messages=[{"role": "user", "content": "Hi"}])
    body = await chat(client, server, max_tokens=1, messages=[{"role": "system", "content": "Be brief."},
                                                              {"role": "user", "content": "Hi"}])
    assert counted.input_tokens == body["usage"]["prompt_tokens"]


async def test_a_history_with_tool_use_and_tool_result_is_chats_tool_history(server, sdk, client):
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": [
                   {"type": "text", "text": "Let me check."},
                   {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21 C"}]}]
    with_result = await sdk.messages.count_tokens(model=server.model, messages=history, tools=TOOLS)
    without = await sdk.messages.count_tokens(model=server.model, messages=history[:1], tools=TOOLS)
    assert with_result.input_tokens > without.input_tokens + 10
    as_chat = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": "Let me check.", "tool_calls": [
                   {"id": "toolu_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny, 21 C"}]
    tools = [{"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"],
                                               **({"description": t["description"]} if "description" in t else {})}}
             for t in TOOLS]
    reply = await post(client, server.url, {"messages": as_chat, "tools": tools}, path="/tokenize")
    assert with_result.input_tokens == reply.body["count"]
    message = await sdk.messages.create(model=server.model, max_tokens=4, messages=history, tools=TOOLS)
    assert message.usage.output_tokens == 4


async def test_output_config_format_forces_json_of_the_schema(server, sdk):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10}},
              "required": ["answer"], "additionalProperties": False}
    message = await sdk.messages.create(model=server.model, max_tokens=100,
                                        output_config={"format": {"type": "json_schema", "schema": schema}},
                                        messages=[{"role": "user", "content": "Answer in JSON"}])
    jsonschema.validate(json.loads(message.content[0].text), schema)
    assert message.stop_reason == "end_turn"


async def test_a_final_assistant_message_is_continued_not_closed(server, sdk, client):
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, here"}]
    counted = await sdk.messages.count_tokens(model=server.model, messages=history)
    reply = await post(client, server.url, {"messages": history, "add_generation_prompt": False,
                                            "continue_final_message": True}, path="/tokenize")
    prompt = (await post(client, server.url, {"tokens": reply.body["tokens"]}, path="/detokenize")).body["prompt"]
    assert counted.input_tokens == reply.body["count"] and prompt.endswith("Sure, here")  # the turn left open
    message = await sdk.messages.create(model=server.model, max_tokens=3, messages=history)
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == counted.input_tokens


# ---------------------------------------------------------------------------- tools


@pytest_asyncio.fixture(loop_scope="module")
async def scripted(server):
    with scripted_output(server, CALL_TEXT) as s:
        yield s


async def test_a_parsed_tool_call_is_a_tool_use_block(scripted, sdk):
    message = await sdk.messages.create(model=scripted.model, max_tokens=100, tools=TOOLS,
                                        messages=[{"role": "user", "content": "Weather in Paris?"}])
    text, call = message.content
    assert text.type == "text" and text.text == "Let me check."
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    assert call.id.startswith("call_") and message.stop_reason == "tool_use"


async def test_a_streamed_tool_call_assembles_into_the_same_block(scripted, sdk):
    kwargs = {"model": scripted.model, "max_tokens": 100, "tools": TOOLS,
              "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    whole = await sdk.messages.create(**kwargs)
    async with sdk.messages.stream(**kwargs) as stream:
        final = await stream.get_final_message()
    assert [(b.type, getattr(b, "text", None), getattr(b, "input", None)) for b in final.content] == \
        [(b.type, getattr(b, "text", None), getattr(b, "input", None)) for b in whole.content]
    assert final.stop_reason == "tool_use"


async def test_tool_choice_none_keeps_the_call_text_as_text(scripted, sdk):
    message = await sdk.messages.create(model=scripted.model, max_tokens=100, tools=TOOLS,
                                        tool_choice={"type": "none"},
                                        messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert [b.type for b in message.content] == ["text"] and message.stop_reason == "end_turn"


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
async def test_a_forced_tool_choice_returns_a_valid_tool_use(server, sdk, choice):
    message = await sdk.messages.create(model=server.model, max_tokens=200, tools=TOOLS, tool_choice=choice,
                                        messages=[{"role": "user", "content": "Weather?"}])
    calls = [b for b in message.content if b.type == "tool_use"]
    # "any" lets the sampled array of calls go on; cut by max_tokens, only its last call is partial
    assert calls and message.stop_reason in ("tool_use", "max_tokens")
    for call in calls[:-1] if message.stop_reason == "max_tokens" else calls:
        schema = next(t["input_schema"] for t in TOOLS if t["name"] == call.name)
        jsonschema.validate(call.input, schema)
    if choice["type"] == "tool":
        assert [c.name for c in calls] == ["get_weather"]


async def test_a_forced_tool_use_streams_whole(server, sdk):
    kwargs = {"model": server.model, "max_tokens": 200, "tools": TOOLS,
              "tool_choice": {"type": "tool", "name": "get_weather"}, "messages": [{"role": "user", "content": "?"}]}
    async with sdk.messages.stream(**kwargs) as stream:
        final = await stream.get_final_message()
    (call,) = final.content
    jsonschema.validate(call.input, TOOLS[0]["input_schema"])


# ---------------------------------------------------------------------------- errors


async def test_an_unknown_model_is_anthropics_not_found_error(sdk):
    with pytest.raises(anthropic.NotFoundError) as caught:
        await sdk.messages.create(model="claude-sonnet-4-5", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "not_found_error"
    assert "claude-sonnet-4-5" in caught.value.body["error"]["message"]


@pytest.mark.parametrize(("body", "words"), [
    ({"messages": HELLO}, "max_tokens"),
    ({"max_tokens": 4, "messages": []}, "messages"),
    ({"max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, "role"),
    ({"max_tokens": 4, "messages": HELLO, "temperature": 1.5}, "temperature"),
    ({"max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, "text only"),
    ({"max_tokens": 4, "messages": HELLO, "tool_choice": {"type": "tool"}, "tools": TOOLS}, "name"),
])
async def test_a_bad_request_is_anthropics_400(server, client, body, words):
    reply = await post(client, server.url, {"model": server.model, **body}, path="/v1/messages")
    assert reply.status == 400
    assert reply.body["type"] == "error" and reply.body["error"]["type"] == "invalid_request_error"
    assert words in reply.body["error"]["message"]


DEEP = '{"a": ' * 990 + "{}" + "}" * 990  # JSON nested past Python's recursion limit (json.dumps cannot write it)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/messages", '{"max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", '
                     '"content": [{"type": "tool_use", "id": "t", "name": "f", "input": %s}]}, {"role": "user", '
                     '"content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]}]}' % DEEP),
    ("/v1/messages/count_tokens", '{"messages": [{"role": "user", "content": "Hi"}], '
                                  '"tools": [{"name": "f", "input_schema": %s}]}' % DEEP),
])
async def test_input_nested_past_pythons_limit_is_a_400(server, client, path, body):
    reply = await post(client, server.url, body.replace("{", '{"model": "%s", ' % server.model, 1).encode(), path=path)
    assert reply.status == 400 and reply.body["error"]["type"] == "invalid_request_error", reply.body  # never a 500


async def test_a_wrong_key_is_anthropics_authentication_error(server):
    async with anthropic.AsyncAnthropic(base_url=server.url, api_key="wrong", max_retries=0) as sdk:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await sdk.messages.create(model=server.model, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    assert caught.value.body["error"]["type"] == "authentication_error"


async def test_an_engine_error_mid_stream_is_an_error_event(server, sdk):
    runner = server.state.engine.runner

    def fail(scheduled, logits):
        raise RuntimeError("injected")

    runner.fault_hook = fail
    try:
        with pytest.raises(anthropic.APIStatusError) as caught:
            async with sdk.messages.stream(model=server.model, max_tokens=4,
                                           messages=[{"role": "user", "content": "Hi"}]) as stream:
                async for _ in stream:
                    pass
    finally:
        runner.fault_hook = None
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == "api_error"


async def test_pings_keep_a_slow_stream_alive(tiny_llama_dir, monkeypatch):
    async with serve(tiny_llama_dir, sse_keepalive_seconds=0.05) as s:
        slow_engine(s.state, monkeypatch, 0.2)
        events = await _raw_events(s, {"model": s.model, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]})
    assert {"type": "ping"} in events
    assert events[-1] == {"type": "message_stop"}
