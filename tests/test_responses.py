"""OpenAI's Responses API (/v1/responses), driven by the openai SDK, every object and event
checked against OpenAI's spec: the same model answers as through chat, in output items, typed
stream events, and stored conversations."""

import json
from collections.abc import AsyncIterator

import aiohttp
import jsonschema
import openai
import pytest
import pytest_asyncio

from openapi_schema import assert_valid
from test_api import Server, chat, post, serve
from test_openai_fields import CLOCK, TEMPLATE, WEATHER, scripted_output

pytestmark = pytest.mark.asyncio(loop_scope="module")

CALL_TEXT = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"type": "function", **WEATHER["function"]}, {"type": "function", **CLOCK["function"]}]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_llama_dir, tmp_path_factory) -> AsyncIterator[Server]:
    template = tmp_path_factory.mktemp("responses") / "tools.jinja"
    template.write_text(TEMPLATE)  # knows tools, compactly: the tiny model's context is short
    async with serve(tiny_llama_dir, {"chat_template": str(template), "max_model_len": 512}) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def sdk(server) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0) as client:
        yield client


async def _create(client, server: Server, **body) -> dict:
    """A non-stream response, as sent, valid against the spec."""
    reply = await post(client, server.url, {"model": server.model, **body}, path="/v1/responses")
    assert reply.status == 200, reply.body
    assert_valid("Response", reply.body)
    return reply.body


async def _events(server: Server, **body) -> list[dict]:
    """A stream's events as sent: each valid against the spec, named by its `event:` line."""
    events = []
    async with aiohttp.ClientSession() as session, session.post(
            server.url + "/v1/responses", json={"model": server.model, "stream": True, **body}) as resp:
        assert resp.status == 200
        for frame in (await resp.text()).split("\n\n"):
            if frame and not frame.startswith(":"):
                lines = dict(line.split(": ", 1) for line in frame.split("\n"))
                event = json.loads(lines["data"])
                assert lines["event"] == event["type"]
                assert_valid("ResponseStreamEvent", event)
                events.append(event)
    return events


async def _prompt_tokens(client, server: Server, messages: list[dict], **extra) -> int:
    return (await post(client, server.url, {"messages": messages, **extra}, path="/tokenize")).body["count"]


async def test_a_response_answers_as_chat_does(server, sdk, client):
    response = await sdk.responses.create(model=server.model, input="Hello there", max_output_tokens=8, temperature=0)
    body = await chat(client, server, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == body["choices"][0]["message"]["content"]
    assert response.usage.input_tokens == body["usage"]["prompt_tokens"]
    assert response.usage.output_tokens == body["usage"]["completion_tokens"]
    expected = {"length": "incomplete", "stop": "completed"}[body["choices"][0]["finish_reason"]]
    assert response.status == expected


async def test_the_raw_object_is_valid_and_names_what_was_asked(server, client):
    body = await _create(client, server, input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                         instructions="Be brief.", max_output_tokens=4, metadata={"k": "v"})
    assert (body["instructions"], body["max_output_tokens"], body["metadata"]) == ("Be brief.", 4, {"k": "v"})
    assert body["usage"]["total_tokens"] == body["usage"]["input_tokens"] + body["usage"]["output_tokens"]


async def test_a_response_cut_by_max_output_tokens_is_incomplete(server, sdk):
    with scripted_output(server, "one two three four five six seven eight nine ten"):
        response = await sdk.responses.create(model=server.model, input="Count", max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].status == "incomplete"


async def test_instructions_are_the_system_message(server, client):
    body = await _create(client, server, input="Hi", instructions="Answer briefly.", max_output_tokens=2)
    assert body["usage"]["input_tokens"] == await _prompt_tokens(
        client, server, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi"}])


async def test_a_stream_builds_the_same_response_event_by_event(server, sdk):
    kwargs = {"model": server.model, "input": "Tell me a story", "max_output_tokens": 100}
    with scripted_output(server, "Once upon a time, a ship sailed."):  # ends: the SDK builds completed ones only
        whole = await sdk.responses.create(**kwargs)
        async with sdk.responses.stream(**kwargs) as stream:
            deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
            final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens and final.status == whole.status


async def test_stream_events_are_in_order_and_numbered(server):
    events = await _events(server, input="Hi", max_output_tokens=5, temperature=0)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          events[-1]["type"]]
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == text


async def test_text_format_json_schema_forces_json_of_the_schema(server, sdk):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10}},
              "required": ["answer"], "additionalProperties": False}
    response = await sdk.responses.create(model=server.model, input="Answer in JSON", max_output_tokens=100,
                                          text={"format": {"type": "json_schema", "name": "a", "schema": schema}})
    jsonschema.validate(json.loads(response.output_text), schema)


async def test_an_engine_error_mid_stream_is_response_failed(server):
    runner, steps = server.state.engine.runner, []

    def fail_from_the_eighth_step(scheduled, logits):
        steps.append(1)
        if len(steps) >= 8:
            raise RuntimeError("injected")

    runner.fault_hook = fail_from_the_eighth_step
    try:
        # Greedy, so the text before the fault is the same whatever ran before this test.
        events = await _events(server, input="Hi", max_output_tokens=20, temperature=0)
    finally:
        runner.fault_hook = None
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.failed"
    assert "response.output_text.delta" in types
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"


async def test_an_engine_error_before_any_output_is_an_http_error(server, client):
    def fail(scheduled, logits):
        raise RuntimeError("injected")

    server.state.engine.runner.fault_hook = fail
    try:
        async with client.post(server.url + "/v1/responses",
                               json={"model": server.model, "input": "Hi", "stream": True}) as resp:
            status, body = resp.status, await resp.json()
    finally:
        server.state.engine.runner.fault_hook = None
    assert status == 500 and body["error"]["code"] == "engine_error"


# ---------------------------------------------------------------------------- tools


async def test_a_parsed_tool_call_is_a_function_call_item(server, sdk, client):
    with scripted_output(server, CALL_TEXT):
        response = await sdk.responses.create(model=server.model, input="Weather in Paris?", tools=TOOLS,
                                              max_output_tokens=100)
        raw = await _create(client, server, input="Weather in Paris?", tools=TOOLS, max_output_tokens=100)
    message, call = response.output
    assert message.type == "message" and message.content[0].text == "Let me check."
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "get_weather", {"city": "Paris"})
    assert call.call_id.startswith("call_") and response.status == "completed"
    assert [t["name"] for t in raw["tools"]] == ["get_weather", "get_time"] and raw["tool_choice"] == "auto"


async def test_a_streamed_tool_call_assembles_into_the_same_item(server):
    with scripted_output(server, CALL_TEXT):
        events = await _events(server, input="Weather in Paris?", tools=TOOLS, max_output_tokens=100)
    arguments = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert json.loads(arguments) == json.loads(done["arguments"]) == {"city": "Paris"}
    assert [item["type"] for item in events[-1]["response"]["output"]] == ["message", "function_call"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
async def test_a_forced_tool_choice_returns_a_valid_call(server, sdk, choice):
    response = await sdk.responses.create(model=server.model, input="Weather?", tools=TOOLS, tool_choice=choice,
                                          max_output_tokens=200)
    calls = [item for item in response.output if item.type == "function_call"]
    # "required" lets the sampled array of calls go on; cut by max_output_tokens, only its last call is partial
    assert calls
    for call in calls[:-1] if response.status == "incomplete" else calls:
        parameters = next(t["parameters"] for t in TOOLS if t["name"] == call.name)
        jsonschema.validate(json.loads(call.arguments), parameters)


async def test_function_call_output_items_are_chats_tool_turns(server, client):
    items = [{"role": "user", "content": "Weather in Paris?"},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"}]
    body = await _create(client, server, input=items, tools=TOOLS, max_output_tokens=2)
    as_chat = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    chat_tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in TOOLS]
    assert body["usage"]["input_tokens"] == await _prompt_tokens(client, server, as_chat, tools=chat_tools)


# ---------------------------------------------------------------------------- stored state


async def test_previous_response_id_continues_the_conversation_without_its_instructions(server, sdk, client):
    first = await sdk.responses.create(model=server.model, input="My name is Ann.", instructions="Be brief.",
                                       max_output_tokens=6, temperature=0)
    second = await sdk.responses.create(model=server.model, input="What is my name?", previous_response_id=first.id,
                                        max_output_tokens=2)
    conversation = [{"role": "user", "content": "My name is Ann."},
                    {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "What is my name?"}]
    assert second.usage.input_tokens == await _prompt_tokens(client, server, conversation)
    assert second.previous_response_id == first.id


async def test_a_stored_response_is_read_back_and_deleted(server, sdk):
    created = await sdk.responses.create(model=server.model, input="Hi", max_output_tokens=3)
    fetched = await sdk.responses.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump()
    await sdk.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(created.id)


async def test_a_response_with_store_false_is_not_kept(server, sdk):
    created = await sdk.responses.create(model=server.model, input="Hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(created.id)


async def test_an_unknown_previous_response_id_is_a_404_naming_it(server, client):
    reply = await post(client, server.url, {"model": server.model, "input": "Hi", "previous_response_id": "resp_x"},
                       path="/v1/responses")
    assert reply.status == 404 and reply.body["error"]["param"] == "previous_response_id"
    assert_valid("ErrorResponse", reply.body)


async def test_the_store_keeps_only_the_newest_responses(tiny_llama_dir, client):
    async with serve(tiny_llama_dir, responses_store_size=2) as small:
        ids = [(await _create(client, small, input="Hi", max_output_tokens=1))["id"] for _ in range(3)]
        found = [(await post(client, small.url, None, path=f"/v1/responses/{i}", method="GET")).status for i in ids]
    assert found == [404, 200, 200]


async def test_a_conversation_past_the_context_is_a_400_in_the_responses_terms(server, client):
    first = await _create(client, server, input="word " * 200, max_output_tokens=2)
    reply = await post(client, server.url, {"model": server.model, "input": "word " * 300,
                                            "previous_response_id": first["id"], "max_output_tokens": 4},
                       path="/v1/responses")
    assert reply.status == 400 and reply.body["error"]["code"] == "context_length_exceeded"
    assert reply.body["error"]["param"] == "input" and "max_output_tokens" in reply.body["error"]["message"]


# ---------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "Hi", "background": True}, "background"),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
     "input[0].content[0]"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": []}, "input"),
    ({"input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
])
async def test_a_bad_request_is_a_400_naming_the_field(server, client, body, param):
    reply = await post(client, server.url, {"model": server.model, **body}, path="/v1/responses")
    assert reply.status == 400 and reply.body["error"]["param"] == param, reply.body
    assert_valid("ErrorResponse", reply.body)
