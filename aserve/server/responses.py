"""POST /v1/responses, GET and DELETE /v1/responses/{id}: OpenAI's Responses API.

A request's `input` items (messages, function_call, function_call_output) and `instructions`
are read into a chat request, which chat's own checks, template, tool handling and guided
decoding serve (chat.prepare), on the same engine. The answer comes back as Responses output
items (reasoning, message with output_text, function_call), or in streams as typed events,
each with a strictly increasing sequence_number; a failure after the headers is
`response.failed`.

Conversation state: a response stored (`store`, true by default, as OpenAI's) keeps its
conversation, the input items before it and its own output, in a bounded in-memory store
(`--responses-store-size`, the oldest evicted first), so `previous_response_id` continues it.
`instructions` are not carried over, as in OpenAI's API. An unknown or evicted id is a 404.
"""

import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field

from aserve.engine.engine_loop import RequestOutput
from aserve.server import chat, generation, protocol
from aserve.server.errors import APIError, json_response
from aserve.server.middleware import request_id
from aserve.server.serving import RequestRecord, ServingState, StoredResponse
from aserve.server.streaming import Framing, write_stream


class FunctionTool(protocol._Lenient):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(protocol._Lenient):
    type: Literal["function"]
    name: str


class TextFormat(protocol._Lenient):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(protocol._Lenient):
    format: TextFormat | None = None
    verbosity: str | None = None  # accepted; it has no effect here


class ResponsesRequest(protocol._Lenient):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float | None, Field(ge=0, le=2)] = None
    top_p: Annotated[float | None, Field(gt=0, le=1)] = None
    tools: list[dict[str, Any]] | None = None  # function tools; others are refused by name
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None  # accepted; the model may call several tools either way
    text: TextConfig | None = None
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    background: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict[str, Any] | None = None  # accepted: the effort is the model's own
    user: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's


class MessageItem(protocol._Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[dict[str, Any]]


class FunctionCallItem(protocol._Lenient):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(protocol._Lenient):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[dict[str, Any]]


_TEXT_PARTS = ("input_text", "output_text", "text")


def _text_of(content: str | list[dict[str, Any]], where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for i, part in enumerate(content):
        if part.get("type") not in _TEXT_PARTS or not isinstance(part.get("text"), str):
            raise APIError(f"content part of type {part.get('type')!r} is not supported: this model reads text only",
                           param=f"{where}.content[{i}]")
        texts.append(part["text"])
    return "\n".join(texts)


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `input` as chat messages: consecutive function_call items join one assistant turn."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    messages: list[dict[str, Any]] = []
    for i, raw in enumerate(items):
        where = f"input[{i}]"
        kind = raw.get("type", "message") if isinstance(raw, dict) else None
        if kind == "message":
            item = protocol._validate(MessageItem, raw, prefix=where)
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": _text_of(item.content, where)})
        elif kind == "function_call":
            call = protocol._validate(FunctionCallItem, raw, prefix=where)
            entry = {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(entry)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [entry]})
        elif kind == "function_call_output":
            result = protocol._validate(FunctionCallOutputItem, raw, prefix=where)
            messages.append({"role": "tool", "tool_call_id": result.call_id, "content": _text_of(result.output, where)})
        elif kind == "reasoning":
            continue  # an earlier answer's reasoning, sent back: not part of the prompt
        else:
            raise APIError(f"input items of type {kind!r} are not supported; use message, function_call, "
                           "function_call_output", param=f"{where}.type")
    return messages


def chat_request(req: ResponsesRequest, history: list[dict]) -> protocol.ChatCompletionRequest:
    """The chat request that says the same to the model, after `history`."""
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + history
    if not messages:
        raise APIError("input is empty", param="input")
    body: dict[str, Any] = {"model": req.model, "messages": messages, "max_tokens": req.max_output_tokens,
                            "temperature": req.temperature, "top_p": req.top_p, "user": req.user,
                            "chat_template_kwargs": req.chat_template_kwargs}
    if req.tools:
        for i, tool in enumerate(req.tools):
            if tool.get("type") != "function":
                raise APIError(f"tools of type {tool.get('type')!r} are not supported; only function tools are",
                               param=f"tools[{i}].type")
        tools = [protocol._validate(FunctionTool, t, prefix=f"tools[{i}]") for i, t in enumerate(req.tools)]
        body["tools"] = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
                         for t in tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        body["tool_choice"] = {"type": "function", "function": {"name": choice.name}} \
            if isinstance(choice, NamedFunction) else choice
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_schema" and fmt.json_schema is None:
            raise APIError("text.format of type json_schema needs its schema", param="text.format.schema")
        body["response_format"] = {"type": "json_object"} if fmt.type == "json_object" else {
            "type": "json_schema", "json_schema": {"name": fmt.name or "output", "schema": fmt.json_schema}}
    return protocol.parse_chat_request({k: v for k, v in body.items() if v is not None})


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Reply:
    """The response object, whole or built up by the stream's events."""

    def __init__(self, state: ServingState, req: ResponsesRequest, chat_req: protocol.ChatCompletionRequest,
                 prepared: chat.PreparedChat, history: list[dict], model: str) -> None:
        self.state, self.req, self.chat_req, self.prepared, self.history = state, req, chat_req, prepared, history
        self.id, self.created = _new_id("resp"), int(time.time())
        self.model = model
        self.store = req.store is not False
        # the tools as the spec's FunctionTool (strict and parameters always present)
        self.tools = [{"type": "function", "name": t["function"]["name"],
                       "description": t["function"].get("description"), "parameters": t["function"].get("parameters"),
                       "strict": t["function"].get("strict")}
                      for t in (tool.model_dump(exclude_none=True) for tool in chat_req.tools or ())]

    def response(self, status: str, output: list[dict], usage: dict | None = None, error: dict | None = None) -> dict:
        req = self.req
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else \
            {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens, "model": self.model,
            "output": output, "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": self.store, "temperature": self.chat_req.temperature if self.chat_req.temperature is not None
            else self.prepared.params.temperature, "top_p": self.prepared.params.top_p,
            "text": {"format": fmt}, "tool_choice": _tool_choice(req), "tools": self.tools,
            "truncation": "disabled", "metadata": req.metadata or {}, "background": False,
            **({"usage": usage} if usage is not None else {}),  # the spec has no null usage: left out until known
            **({"user": req.user} if req.user is not None else {}),
        }

    def usage(self, out: generation.Choice | RequestOutput, reasoning: str) -> dict:
        thought = len(self.state.tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
        return {"input_tokens": out.prompt_tokens,
                "input_tokens_details": {"cached_tokens": out.cached_tokens, "cache_write_tokens": 0},
                "output_tokens": out.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": min(thought, out.completion_tokens)},
                "total_tokens": out.prompt_tokens + out.completion_tokens}

    def complete(self, choice: generation.Choice) -> dict:
        reasoning, rest = self.prepared.split_reasoning(choice.text)
        text, calls = chat.split_calls(self.state, self.chat_req, rest)
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        output = ([_reasoning_item(_new_id("rs"), reasoning)] if reasoning else []) + \
            ([_message_item(_new_id("msg"), text, status)] if text else []) + \
            [_call_item(_new_id("fc"), call.id, call.name, call.arguments) for call in calls]
        return self.finished(status, output, choice)

    def finished(self, status: str, output: list[dict], out: generation.Choice | RequestOutput) -> dict:
        """The finished response, its usage counting its reasoning items' tokens; stored, when
        asked, with its conversation: the history, then its output as chat's assistant turn."""
        def texts(kind: str) -> str:
            return "".join(part["text"] for item in output if item["type"] == kind for part in item["content"])

        response = self.response(status, output, self.usage(out, texts("reasoning")))
        if self.store:
            turn: dict[str, Any] = {"role": "assistant", "content": texts("message") or None}
            if calls := [item for item in output if item["type"] == "function_call"]:
                turn["tool_calls"] = [{"id": c["call_id"], "type": "function",
                                       "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
            self.state.responses.put(StoredResponse(response, self.history + [turn]))
        return response

    async def stream(self, request: web.Request, outputs: AsyncIterator[tuple[int, RequestOutput]],
                     record: RequestRecord) -> web.StreamResponse:
        events = _StreamEvents(self)
        framing = Framing(typed=True, done_marker=False, error_event=events.error)
        return await write_stream(request, self.state, self.id, outputs, lambda _, out: events.render(out), record,
                                  opening=events.opening(), framing=framing)


def _tool_choice(req: ResponsesRequest) -> Any:
    if isinstance(req.tool_choice, NamedFunction):
        return req.tool_choice.model_dump()
    return req.tool_choice or "auto"


def _message_item(item_id: str, text: str, status: str) -> dict:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [_output_text(text)]}


def _output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _reasoning_item(item_id: str, text: str) -> dict:
    return {"id": item_id, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}],
            "status": "completed"}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


class _StreamEvents:
    """The chat path's output parts (chat.OutputParts) as the Responses API's events. Each kind
    of part opens an output item (reasoning, message, function_call), the next kind closes it;
    every event carries the next sequence number."""

    def __init__(self, reply: _Reply) -> None:
        self.reply = reply
        self.parts = chat.OutputParts(reply.state, reply.chat_req, reply.prepared)
        self.sequence = 0
        self.output: list[dict] = []  # finished items
        self.item: dict | None = None  # the open item
        self.text = ""  # the open item's text or arguments so far

    def _event(self, kind: str, **fields: Any) -> dict:
        event = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return event

    def opening(self) -> list[dict]:
        skeleton = self.reply.response("in_progress", [])
        return [self._event("response.created", response=skeleton),
                self._event("response.in_progress", response=skeleton)]

    def error(self, error: APIError) -> dict:
        """A failure after the headers: response.failed, with the items finished so far."""
        failed = self.reply.response("failed", self.output, error={"code": "server_error", "message": error.message})
        return self._event("response.failed", response=failed)

    def render(self, out: RequestOutput) -> list[dict]:
        events = []
        for kind, *values in self.parts.push(out):
            if kind == "reasoning":
                events += self._delta("reasoning", "response.reasoning_text.delta", values[0], content_index=0)
            elif kind == "text":
                events += self._delta("message", "response.output_text.delta", values[0], content_index=0,
                                      logprobs=[])
            elif kind == "call":
                events += self._close()
                events += self._open(_call_item(_new_id("fc"), values[0], values[1], "", "in_progress"))
            else:
                self.text += values[0]
                events.append(self._event("response.function_call_arguments.delta", item_id=self.item["id"],
                                          output_index=len(self.output), delta=values[0]))
        if out.finish_reason:
            events += self._close()
            status = "incomplete" if out.finish_reason == "length" else "completed"
            for item in self.output:
                if item["type"] == "message":
                    item["status"] = status
            response = self.reply.finished(status, self.output, out)
            events.append(self._event(f"response.{status}", response=response))
        return events

    def _delta(self, item_type: str, kind: str, delta: str, **fields: Any) -> list[dict]:
        events = []
        if self.item is None or self.item["type"] != item_type:
            events += self._close()
            events += self._open(_reasoning_item(_new_id("rs"), "") | {"content": [], "status": "in_progress"}
                                 if item_type == "reasoning" else
                                 _message_item(_new_id("msg"), "", "in_progress") | {"content": []})
        self.text += delta
        return events + [self._event(kind, item_id=self.item["id"], output_index=len(self.output), delta=delta,
                                     **fields)]

    def _open(self, item: dict) -> list[dict]:
        self.item, self.text = item, ""
        events = [self._event("response.output_item.added", output_index=len(self.output), item=item)]
        if item["type"] == "message":
            events.append(self._event("response.content_part.added", item_id=item["id"], output_index=len(self.output),
                                      content_index=0, part=_output_text("")))
        return events

    def _close(self) -> list[dict]:
        item, index = self.item, len(self.output)
        if item is None:
            return []
        self.item = None
        common = {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            done = _message_item(item["id"], self.text, "completed")
            events = [self._event("response.output_text.done", **common, content_index=0, text=self.text, logprobs=[]),
                      self._event("response.content_part.done", **common, content_index=0, part=_output_text(self.text))]
        elif item["type"] == "reasoning":
            done = _reasoning_item(item["id"], self.text)
            events = [self._event("response.reasoning_text.done", **common, content_index=0, text=self.text)]
        else:
            done = _call_item(item["id"], item["call_id"], item["name"], self.text)
            events = [self._event("response.function_call_arguments.done", **common, name=item["name"],
                                  arguments=self.text)]
        self.output.append(done)
        return events + [self._event("response.output_item.done", output_index=index, item=done)]


async def create_response(request: web.Request) -> web.StreamResponse:
    state: ServingState = request.app[ServingState.KEY]
    req = protocol.parse_request(ResponsesRequest, await chat.read_json(request))
    if req.background:
        raise APIError("background responses are not supported; send background: false (or leave it out)",
                       param="background")
    if req.truncation == "auto":
        raise APIError("truncation 'auto' is not supported: an input too long for the context is a 400",
                       param="truncation")
    history = state.responses.get(req.previous_response_id, "previous_response_id").history \
        if req.previous_response_id else []
    history = history + input_messages(req.input)
    chat_req = chat_request(req, history)
    prepared = await chat.prepare(state, chat_req, names=("input", "max_output_tokens"))
    reply = _Reply(state, req, chat_req, prepared, history, state.served_name(prepared.lora))
    with state.admit(1, request_id(request), reply.id) as record:
        outputs = generation.start(state, reply.id, [prepared.prompt_ids], prepared.params, 1, prepared.grammar,
                                   record, None, prepared.lora)
        if req.stream:
            return await reply.stream(request, outputs, record)
        (choice,) = await generation.collect(outputs, 1)
        return json_response(reply.complete(choice))


async def get_response(request: web.Request) -> web.Response:
    state: ServingState = request.app[ServingState.KEY]
    return json_response(state.responses.get(request.match_info["response_id"]).response)


async def delete_response(request: web.Request) -> web.Response:
    state: ServingState = request.app[ServingState.KEY]
    response_id = request.match_info["response_id"]
    state.responses.get(response_id)
    del state.responses.items[response_id]
    return json_response({"id": response_id, "object": "response", "deleted": True})


def add_responses_routes(app: web.Application) -> None:
    app.add_routes([web.post("/v1/responses", create_response),
                    web.get("/v1/responses/{response_id}", get_response),
                    web.delete("/v1/responses/{response_id}", delete_response)])
