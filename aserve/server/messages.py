"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API, for its SDK.

A Messages request is read into a chat request (system, text, tool_use and tool_result
blocks; tools and tool_choice) and goes through chat's own checks, template, tokenization
and tool handling (chat.prepare), then the same engine. Only the response is Anthropic's:
content blocks (text, tool_use), its stop reasons, its usage, and in streams its typed
events (message_start, content_block_start / _delta / _stop, message_delta, message_stop,
ping as the keep-alive, error). Errors take Anthropic's shape (errors.anthropic_path).

Usage as Anthropic counts it: `input_tokens` are the prompt tokens not read from the prefix
cache, `cache_read_input_tokens` those that were; nothing is ever written to a cache on
request, so `cache_creation_input_tokens` is 0.
"""

import json
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import pydantic_core
from aiohttp import web
from pydantic import Field

from aserve.engine.engine_loop import RequestOutput
from aserve.server import chat, generation, protocol
from aserve.server.chat_prompt import chat_inputs
from aserve.server.errors import APIError, json_response
from aserve.server.middleware import request_id
from aserve.server.serving import RequestRecord, ServingState
from aserve.server.streaming import Framing, write_stream
from aserve.server.tool_parsers import ToolCall

MAX_STOP_SEQUENCES = protocol.MAX_STOP_STRINGS
FRAMING = Framing(typed=True, done_marker=False, keepalive={"type": "ping"}, error_event=APIError.anthropic_body)


class TextBlock(protocol._Lenient):
    type: Literal["text"]
    text: str


class ToolUseBlock(protocol._Lenient):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(protocol._Lenient):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "\n".join(block.text for block in self.content)


class ThinkingBlock(protocol._Lenient):
    """An earlier answer's thinking, sent back in the history: not part of the prompt."""

    type: Literal["thinking", "redacted_thinking"]


class MediaBlock(protocol._Lenient):
    """Accepted by the schema only to be refused with a clear message: this model reads text."""

    type: Literal["image", "document", "search_result"]


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | MediaBlock, Field(discriminator="type")]


class Message(protocol._Lenient):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(protocol._Lenient):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(protocol._Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None  # accepted; the model may call several tools either way


class CountTokensRequest(protocol._Lenient):
    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


class OutputFormat(protocol._Lenient):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(protocol._Lenient):
    """Structured outputs: the answer forced into a JSON schema, by the same guided decoding as
    OpenAI's response_format. `effort` is accepted and has no effect here."""

    effort: str | None = None
    format: OutputFormat | None = None


class ThinkingConfig(protocol._Lenient):
    """Thinking on or off, passed to the chat template as enable_thinking (Qwen3's switch);
    budget_tokens is accepted and not enforced."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[int, Field(ge=1)]  # required, as in Anthropic's API
    stop_sequences: Annotated[list[str] | None, Field(max_length=MAX_STOP_SEQUENCES)] = None
    temperature: Annotated[float | None, Field(ge=0, le=1)] = None
    top_p: Annotated[float | None, Field(gt=0, le=1)] = None
    top_k: Annotated[int | None, Field(ge=0)] = None
    stream: bool | None = None
    metadata: dict[str, Any] | None = None  # accepted and ignored
    output_config: OutputConfig | None = None
    thinking: ThinkingConfig | None = None


def _block_text(blocks: list) -> str:
    return "\n".join(b.text for b in blocks if isinstance(b, TextBlock))


def chat_request(req: CountTokensRequest) -> protocol.ChatCompletionRequest:
    """The chat request that says the same to the model."""
    try:
        return _chat_request(req)
    except RecursionError:  # json.dumps of a tool_use input nested past Python's limit
        raise APIError("a tool_use input nests too deeply", param="messages") from None


def _chat_request(req: CountTokensRequest) -> protocol.ChatCompletionRequest:
    messages: list[dict[str, Any]] = []
    if req.system:
        system = req.system if isinstance(req.system, str) else _block_text(req.system)
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        if not isinstance(m.content, str) and (media := [j for j, b in enumerate(m.content) if isinstance(b, MediaBlock)]):
            raise APIError(f"content blocks of type {m.content[media[0]].type!r} are not supported: this model reads "
                           "text only", param=f"messages[{i}].content[{media[0]}].type")
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        if m.role == "assistant":
            calls = [{"id": b.id, "type": "function",
                      "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
                     for b in m.content if isinstance(b, ToolUseBlock)]
            messages.append({"role": "assistant", "content": _block_text(m.content), **({"tool_calls": calls} if calls else {})})
            continue
        # A user turn: its tool results first (each a tool message, as chat templates expect), then its text.
        for b in m.content:
            if isinstance(b, ToolResultBlock):
                content = f"Error: {b.text()}" if b.is_error else b.text()
                messages.append({"role": "tool", "tool_call_id": b.tool_use_id, "content": content})
        if any(isinstance(b, TextBlock) for b in m.content) or not any(isinstance(b, ToolResultBlock) for b in m.content):
            messages.append({"role": "user", "content": _block_text(m.content)})
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    if req.messages[-1].role == "assistant":  # a prefill: the answer continues that text, as Anthropic's does
        body.update(add_generation_prompt=False, continue_final_message=True)
    if req.tools:
        body["tools"] = [{"type": "function", "function": {"name": t.name, "parameters": t.input_schema,
                                                           **({"description": t.description} if t.description else {})}}
                         for t in req.tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        if choice.type == "tool":
            if not choice.name:
                raise APIError("tool_choice of type 'tool' needs the tool's name", param="tool_choice.name")
            body["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        elif choice.type == "any" and not req.tools:
            raise APIError("tool_choice of type 'any' needs tools", param="tool_choice")
        elif req.tools or choice.type == "none":
            body["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if isinstance(req, MessagesRequest) and req.output_config is not None and req.output_config.format is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": req.output_config.format.json_schema}}
    if isinstance(req, MessagesRequest) and req.thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": req.thinking.type != "disabled"}
    if isinstance(req, MessagesRequest):
        body.update({k: v for k, v in (("max_tokens", req.max_tokens), ("stop", req.stop_sequences or None),
                                       ("temperature", req.temperature), ("top_p", req.top_p), ("top_k", req.top_k))
                     if v is not None})
    return protocol.parse_chat_request(body)


def _stop_reason(finish_reason: str | None, stop_sequence: str | None, called: bool) -> str:
    if finish_reason == "length":
        return "max_tokens"
    if called:
        return "tool_use"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def _tool_use(call: ToolCall) -> dict:
    try:  # JSON cut off by max_tokens: the object as far as it got
        arguments = pydantic_core.from_json(call.arguments, allow_partial="trailing-strings")
    except ValueError:
        arguments = {}
    return {"type": "tool_use", "id": call.id, "name": call.name,
            "input": arguments if isinstance(arguments, dict) else {}}


def _usage(choice: generation.Choice | RequestOutput) -> dict:
    return {"input_tokens": choice.prompt_tokens - choice.cached_tokens, "output_tokens": choice.completion_tokens,
            "cache_read_input_tokens": choice.cached_tokens, "cache_creation_input_tokens": 0}


async def count_tokens(request: web.Request) -> web.Response:
    state: ServingState = request.app[ServingState.KEY]
    req = protocol.parse_request(CountTokensRequest, await chat.read_json(request))
    chat_req = chat_request(req)
    state.check_model(chat_req.model)
    state.check_prompt_chars(sum(len(m.text(i)) for i, m in enumerate(chat_req.messages)), "messages")
    if len(chat_req.messages) > state.settings.max_messages:
        raise APIError(f"too many messages: {len(chat_req.messages)}, the limit is {state.settings.max_messages}",
                       param="messages")
    try:
        messages, tools = chat_inputs(chat_req, state.template_tools)
    except RecursionError:  # json.dumps of a tool's input_schema
        raise APIError("a tool's input_schema nests too deeply", param="tools") from None
    ids = await state.encode_chat(messages, tools, chat_req.add_generation_prompt,
                                  template_kwargs=chat_req.chat_template_kwargs,
                                  continue_final_message=chat_req.continue_final_message)
    return json_response({"input_tokens": len(ids)})


async def messages(request: web.Request) -> web.StreamResponse:
    state: ServingState = request.app[ServingState.KEY]
    req = protocol.parse_request(MessagesRequest, await chat.read_json(request))
    chat_req = chat_request(req)
    prepared = await chat.prepare(state, chat_req)
    rid = f"msg_{uuid.uuid4().hex}"
    with state.admit(1, request_id(request), rid) as record:
        outputs = generation.start(state, rid, [prepared.prompt_ids], prepared.params, 1, prepared.grammar, record,
                                   None, prepared.lora)
        reply = _Reply(state, chat_req, prepared, rid, req.model)
        if req.stream:
            return await reply.stream(request, outputs, record)
        (choice,) = await generation.collect(outputs, 1)
        return json_response(reply.complete(choice))


class _Reply:
    def __init__(self, state: ServingState, req: protocol.ChatCompletionRequest, prepared: chat.PreparedChat, rid: str,
                 model: str) -> None:
        self.state, self.req, self.prepared, self.rid, self.model = state, req, prepared, rid, model

    def _message(self, content: list[dict], stop_reason: str | None, stop_sequence: str | None, usage: dict) -> dict:
        return {"id": self.rid, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage}

    def complete(self, choice: generation.Choice) -> dict:
        reasoning, rest = self.prepared.split_reasoning(choice.text)
        text, calls = chat.split_calls(self.state, self.req, rest)
        # A thinking block's signature proves Anthropic's servers wrote it; there is none here.
        content = ([{"type": "thinking", "thinking": reasoning, "signature": ""}] if reasoning else []) + \
            ([{"type": "text", "text": text}] if text else []) + [_tool_use(c) for c in calls]
        stop = _stop_reason(choice.finish_reason, choice.stop_sequence, bool(calls))
        return self._message(content, stop, choice.stop_sequence if stop == "stop_sequence" else None, _usage(choice))

    async def stream(self, request: web.Request, outputs: AsyncIterator[tuple[int, RequestOutput]],
                     record: RequestRecord) -> web.StreamResponse:
        events = _StreamEvents(self)
        return await write_stream(request, self.state, self.rid, outputs, lambda _, out: events.render(out), record,
                                  framing=FRAMING)


class _StreamEvents:
    """The chat path's output parts (chat.OutputParts) as Anthropic's events: each kind of part
    opens its block (thinking, text, tool_use) and the next kind closes it."""

    def __init__(self, reply: _Reply) -> None:
        self.reply = reply
        self.parts = chat.OutputParts(reply.state, reply.req, reply.prepared)
        self.started = False
        self.index = -1  # the open block's index
        self.open: str | None = None  # its type

    def render(self, out: RequestOutput) -> list[dict]:
        events = []
        if not self.started:
            self.started = True
            usage = {**_usage(out), "output_tokens": 0}  # none yet
            events.append({"type": "message_start", "message": self.reply._message([], None, None, usage)})
        for kind, *values in self.parts.push(out):
            if kind == "reasoning":
                events += self._thinking(values[0])
            elif kind == "text":
                events += self._text(values[0])
            elif kind == "call":
                events += self._open({"type": "tool_use", "id": values[0], "name": values[1], "input": {}})
            else:
                events.append({"type": "content_block_delta", "index": self.index,
                               "delta": {"type": "input_json_delta", "partial_json": values[0]}})
        if out.finish_reason:
            events += self._close()
            stop = _stop_reason(out.finish_reason, out.stop_sequence, self.parts.called)
            events.append({"type": "message_delta",
                           "delta": {"stop_reason": stop,
                                     "stop_sequence": out.stop_sequence if stop == "stop_sequence" else None},
                           "usage": _usage(out)})
            events.append({"type": "message_stop"})
        return events

    def _thinking(self, text: str) -> list[dict]:
        events = [] if self.open == "thinking" else self._open({"type": "thinking", "thinking": "", "signature": ""})
        return events + [{"type": "content_block_delta", "index": self.index,
                          "delta": {"type": "thinking_delta", "thinking": text}}]

    def _text(self, text: str) -> list[dict]:
        events = [] if self.open == "text" else self._open({"type": "text", "text": ""})
        return events + [{"type": "content_block_delta", "index": self.index, "delta": {"type": "text_delta", "text": text}}]

    def _open(self, block: dict) -> list[dict]:
        events = self._close()
        self.index += 1
        self.open = block["type"]
        return events + [{"type": "content_block_start", "index": self.index, "content_block": block}]

    def _close(self) -> list[dict]:
        if self.open is None:
            return []
        self.open = None
        return [{"type": "content_block_stop", "index": self.index}]


def add_messages_routes(app: web.Application) -> None:
    app.add_routes([web.post("/v1/messages", messages), web.post("/v1/messages/count_tokens", count_tokens)])
