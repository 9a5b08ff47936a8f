"""POST /v1/chat/completions: validate, apply the chat template, tokenize, queue, respond.

Everything that can reject a request happens before the 200 headers go out, so a bad
request is always a real 4xx and never a broken stream.

Tools: with tool_choice "auto" (the default when tools are given) the model's text is read by
the configured tool parser, in streams as it arrives. With "required" or a named function the
output is forced, by guided decoding, into JSON that is the call(s) (as vLLM does), and the
calls are read from that JSON.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pydantic_core
from aiohttp import web

from aserve.engine.engine_loop import RequestOutput
from aserve.engine.sequence import SamplingParams
from aserve.models.lora import LoRAAdapter
from aserve.server import generation, objects, protocol
from aserve.server.chat_prompt import chat_inputs
from aserve.server.errors import APIError, json_response
from aserve.server.logprobs import chat_logprobs
from aserve.server.reasoning import ReasoningParser, ReasoningStream
from aserve.server.middleware import request_id
from aserve.server.serving import RequestRecord, ServingState
from aserve.server.streaming import write_stream
from aserve.server.tool_parsers import ToolCall, new_call_id


async def read_json(request: web.Request) -> object:
    # Only a body declared JSON: a form or text/plain POST is a "simple" cross-origin request
    # that any web page can send to a local server without a CORS preflight (a CSRF).
    if request.content_type != "application/json":
        raise APIError(f"the request body must be JSON, sent with 'Content-Type: application/json' "
                       f"(this one was {request.headers.get('Content-Type', 'not given')!r})", status=415,
                       code="unsupported_media_type")
    body = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise APIError(f"the request body is not valid JSON: {exc}", code="invalid_json") from None


def forced_tool_schema(req: protocol.ChatCompletionRequest) -> dict | None:
    """The JSON schema that tool_choice "required" or a named function forces the output into."""
    choice = req.tool_choice
    if isinstance(choice, protocol.NamedToolChoice):
        tool = next(t for t in req.tools if t.function.name == choice.function.name)
        return tool.function.parameters or {"type": "object"}
    if choice == "required":
        calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                   "parameters": t.function.parameters or {"type": "object"}},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in req.tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if req.parallel_tool_calls is False:
            schema["maxItems"] = 1  # one call, as OpenAI makes it
        return schema
    return None


def forced_tools_strict(req: protocol.ChatCompletionRequest) -> bool:
    """A forced function marked `strict: true` promises its schema exactly: a keyword the grammar
    cannot enforce is then a 400, not ignored."""
    choice = req.tool_choice
    forced = [t for t in req.tools or () if not isinstance(choice, protocol.NamedToolChoice)
              or t.function.name == choice.function.name]
    return any(t.function.strict for t in forced)


def forced_calls(req: protocol.ChatCompletionRequest, text: str) -> list[ToolCall]:
    """The calls in a forced output, also when max_tokens cut it (finish_reason "length" then
    says so), as vLLM returns them: a named function's arguments are the JSON as far as it
    got, and with "required" each call whose function name is complete comes with the
    parameters written so far."""
    if isinstance(req.tool_choice, protocol.NamedToolChoice):
        try:
            arguments = json.dumps(json.loads(text), ensure_ascii=False)
        except ValueError:  # cut off: the text as it stands
            arguments = text
        return [ToolCall(new_call_id(), req.tool_choice.function.name, arguments)]
    try:
        value = pydantic_core.from_json(text, allow_partial="trailing-strings")
    except ValueError:
        return []
    names = {t.function.name for t in req.tools or ()}  # a name cut short is no function's
    return [ToolCall(new_call_id(), c["name"], json.dumps(c.get("parameters", {}), ensure_ascii=False))
            for c in value if isinstance(c, dict) and c.get("name") in names] if isinstance(value, list) else []


@dataclass
class PreparedChat:
    """A chat request checked, templated and tokenized: what the engine runs."""

    prompt_ids: list[int]
    params: SamplingParams
    grammar: Any
    lora: LoRAAdapter | None
    reasoning: ReasoningParser | None = None  # splits thinking from the answer; None: no thinking expected
    prompt_tail: str = ""  # the rendered prompt's last characters: whether the template opened <think>

    def split_reasoning(self, text: str) -> tuple[str | None, str]:
        """(reasoning, the rest) of a whole output."""
        return self.reasoning.parse(self.prompt_tail, text) if self.reasoning is not None else (None, text)

    def reasoning_stream(self) -> ReasoningStream | None:
        return self.reasoning.stream(self.prompt_tail) if self.reasoning is not None else None


async def prepare(state: ServingState, req: protocol.ChatCompletionRequest,
                  names: tuple[str, str] | None = None) -> PreparedChat:
    """Everything that can reject a chat request, before any response goes out; shared by the
    endpoints that speak chat underneath (Anthropic's Messages, the Responses API), which give
    their own `names` for the prompt and max_tokens."""
    lora = await state.loaded_adapter(state.check_model(req.model))
    limits = state.settings
    if len(req.messages) > limits.max_messages:
        raise APIError(f"too many messages: {len(req.messages)}, the limit is {limits.max_messages}", param="messages")
    state.check_prompt_chars(sum(len(m.text(i)) for i, m in enumerate(req.messages)), "messages")
    try:
        messages, tools = chat_inputs(req, state.template_tools)
    except RecursionError:  # json.dumps of a tool's parameters schema
        raise APIError("a tool's parameters nest too deeply", param="tools") from None
    prompt_ids = await state.encode_chat(messages, tools, req.add_generation_prompt,
                                         template_kwargs=req.chat_template_kwargs,
                                         continue_final_message=req.continue_final_message)
    schema = forced_tool_schema(req)
    if schema is not None:
        grammar = await state.compile_grammar({"type": "json_schema", "json_schema": {
            "name": "tools", "schema": schema, "strict": forced_tools_strict(req)}})
    else:
        grammar = await generation.compile_response_format(state, req.response_format)
    params = generation.sampling_params(req, len(prompt_ids), state,
                                        max_tokens=req.requested_max_tokens,
                                        logprobs=(req.top_logprobs or 0) if req.logprobs else None, names=names)
    # Output forced into JSON (calls, response_format) has no thinking in it.
    reasoning = state.reasoning_parser if grammar is None else None
    tail = state.tokenizer.decode(prompt_ids[-8:]) if reasoning is not None else ""
    return PreparedChat(prompt_ids, params, grammar, lora, reasoning, tail)


def split_calls(state: ServingState, req: protocol.ChatCompletionRequest, text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole output as (content, tool calls): forced calls read from their JSON, else the tool
    parser's reading when tool_choice is auto, else all content."""
    if forces_tools(req):
        calls = forced_calls(req, text)
        return (None, calls) if calls else (text, [])
    if parses_tools(req):
        return state.tool_parser.parse(text)
    return text, []


def parses_tools(req: protocol.ChatCompletionRequest) -> bool:
    """The tool parser reads calls out of the model's text (tool_choice auto)."""
    return bool(req.tools) and req.tool_choice in (None, "auto")


def forces_tools(req: protocol.ChatCompletionRequest) -> bool:
    """Guided decoding forces the output into calls (tool_choice required or a named function)."""
    return bool(req.tools) and req.tool_choice not in (None, "auto", "none")


class OutputParts:
    """One output of the chat path as it streams, in the parts that each API builds its events
    from: ("reasoning", text), ("text", text), ("call", id, name, index), ("arguments", json
    fragment, index of its call). Calls come as the tool parser reads them (tool_choice auto)
    or, forced, whole at the end, once their JSON is complete."""

    def __init__(self, state: ServingState, req: protocol.ChatCompletionRequest, prepared: PreparedChat) -> None:
        self.state, self.req = state, req
        self.parser = state.tool_parser.streaming() if parses_tools(req) else None
        self.forced = forces_tools(req)
        self.thinking = prepared.reasoning_stream()
        self.whole = ""  # the forced output so far
        self.called = False  # a call was among the parts

    def push(self, out: RequestOutput) -> list[tuple[str, ...]]:
        parts: list[tuple[str, ...]] = []
        text = out.text
        if self.thinking is not None:
            reasoning, text = self.thinking.split(out.text, final=out.finish_reason is not None)
            if reasoning:
                parts.append(("reasoning", reasoning))
        if self.forced:
            self.whole += text
            if out.finish_reason:
                content, calls = split_calls(self.state, self.req, self.whole)
                parts += [("text", content)] if content else []
                for index, call in enumerate(calls):
                    parts += [("call", call.id, call.name, index), ("arguments", call.arguments, index)]
        elif self.parser is not None:
            deltas = (self.parser.push(text) if text else []) + (self.parser.finish() if out.finish_reason else [])
            for delta in deltas:
                if delta.get("content"):
                    parts.append(("text", delta["content"]))
                for fragment in delta.get("tool_calls") or []:
                    function = fragment.get("function", {})
                    if "id" in fragment:
                        parts.append(("call", fragment["id"], function["name"], fragment["index"]))
                    if function.get("arguments"):
                        parts.append(("arguments", function["arguments"], fragment["index"]))
        elif text:
            parts.append(("text", text))
        self.called = self.called or any(part[0] == "call" for part in parts)
        return parts


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state: ServingState = request.app[ServingState.KEY]
    req = protocol.parse_chat_request(await read_json(request))
    prepared = await prepare(state, req)
    n = req.n or 1
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    with state.admit(n, request_id(request), rid) as record:
        outputs = generation.start(state, rid, [prepared.prompt_ids], prepared.params, n, prepared.grammar, record,
                                   req.cache_salt, prepared.lora)
        reply = _Reply(state, req, prepared, rid, int(time.time()), state.served_name(prepared.lora))
        if req.stream:
            return await reply.stream(request, outputs, n, record)
        return json_response(reply.complete(await generation.collect(outputs, n)))


class _Reply:
    def __init__(self, state: ServingState, req: protocol.ChatCompletionRequest, prepared: PreparedChat, rid: str,
                 created: int, model: str) -> None:
        self.state, self.req, self.prepared, self.rid, self.created = state, req, prepared, rid, created
        self.model = model  # the name the response gives: the adapter asked for, else the base model
        self.include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)

    def _logprobs(self, out: generation.Choice | RequestOutput) -> dict | None:
        return chat_logprobs(out.logprobs, self.state.token_text) if self.req.logprobs else None

    def complete(self, choices: list[generation.Choice]) -> dict:
        body = []
        for c in choices:
            reasoning, text = self.prepared.split_reasoning(c.text)
            content, calls = split_calls(self.state, self.req, text)
            finish = "tool_calls" if calls and c.finish_reason == "stop" else c.finish_reason
            body.append(objects.chat_choice(c.index, content, finish, self._logprobs(c),
                                            [call.to_openai() for call in calls], reasoning))
        return objects.chat_completion(self.rid, self.model, self.created, body, _usage(choices))

    def _chunk(self, index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return objects.chat_chunk(self.rid, self.model, self.created, index, delta, finish,
                                  self.include_usage, logprobs)

    async def stream(self, request: web.Request, outputs: AsyncIterator[tuple[int, RequestOutput]], n: int,
                     record: RequestRecord) -> web.StreamResponse:
        choices = [generation.Choice(i) for i in range(n)]  # for the usage
        parts = [OutputParts(self.state, self.req, self.prepared) for _ in range(n)]

        def render(i: int, out: RequestOutput) -> list[dict]:
            choices[i].add(out)
            return self._deltas(i, out, parts[i])

        def closing() -> list[dict]:
            if not self.include_usage:
                return []
            return [objects.usage_chunk(self.rid, self.model, self.created, _usage(choices))]

        opening = [self._chunk(i, {"role": "assistant", "content": ""}) for i in range(n)]
        return await write_stream(request, self.state, self.rid, outputs, render, record, opening=opening,
                                  closing=closing)

    def _deltas(self, i: int, out: RequestOutput, parts: OutputParts) -> list[dict]:
        logprobs = self._logprobs(out) if out.logprobs else None
        deltas = [_delta(part) for part in parts.push(out)]
        if logprobs is not None and not deltas:
            deltas = [{}]  # logprobs of tokens whose text is still held back
        chunks = [self._chunk(i, d, logprobs=logprobs if k == 0 else None) for k, d in enumerate(deltas)]
        if out.finish_reason:
            finish = "tool_calls" if parts.called and out.finish_reason == "stop" else out.finish_reason
            chunks.append(self._chunk(i, {}, finish))
        return chunks


def _delta(part: tuple) -> dict:
    """An output part (OutputParts) as a chat stream's delta: the thinking as vLLM streams it
    (reasoning_content, and reasoning), a call's id and name, then its arguments."""
    kind, value, *rest = part
    if kind == "reasoning":
        return {"reasoning_content": value, "reasoning": value}
    if kind == "text":
        return {"content": value}
    if kind == "call":
        name, index = rest
        return {"tool_calls": [{"index": index, "id": value, "type": "function",
                                "function": {"name": name, "arguments": ""}}]}
    return {"tool_calls": [{"index": rest[0], "function": {"arguments": value}}]}


def _usage(choices: list[generation.Choice]) -> dict:
    # The prompt is counted once, however many choices share it (as OpenAI counts it).
    return objects.usage(choices[0].prompt_tokens, sum(c.completion_tokens for c in choices),
                         choices[0].cached_tokens)
