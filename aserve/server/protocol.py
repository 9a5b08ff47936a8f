"""The OpenAI request schema (validated with pydantic) and the response objects we send.

Liberal in what we accept: unknown fields are ignored and null means "not set". Strict
about types: a string where a number belongs is a 400, not a silent coercion.
"""

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aserve.server.errors import APIError

MAX_STOP_STRINGS = 4
_TOKEN_ID = re.compile(r"[0-9]{1,10}")
MAX_N = 16  # choices per request
MAX_LOGPROBS = 20  # top alternatives per token, OpenAI's limit for chat


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class FunctionCall(_Lenient):
    name: str
    arguments: str


class ToolCallIn(_Lenient):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def text(self, index: int) -> str:
        """The content as one string; `index` is this message's place, for error messages."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for i, part in enumerate(self.content):
            if part.get("type") != "text":
                raise APIError(
                    f"content part of type {part.get('type')!r} is not supported: this model reads text only",
                    param=f"messages[{index}].content[{i}].type",
                )
            texts.append(_validate(TextPart, part, prefix=f"messages[{index}].content[{i}]").text)
        return "\n".join(texts)


class FunctionDef(_Lenient):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _GenerationRequest(_Lenient):
    """The fields the chat and completions endpoints share."""

    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float | None, Field(ge=0)] = None
    top_p: Annotated[float | None, Field(gt=0, le=1)] = None
    top_k: Annotated[int | None, Field(ge=-1)] = None  # vLLM extension; -1 or 0: off
    seed: Annotated[int | None, Field(ge=-(2**63), lt=2**63)] = None  # what torch.Generator takes, with room for n
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    # OpenAI's newer name for max_tokens on chat; also taken on /v1/completions (aserve extension).
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    stop: str | list[str] | None = None
    n: Annotated[int | None, Field(ge=1, le=MAX_N)] = None
    presence_penalty: Annotated[float | None, Field(ge=-2, le=2)] = None
    frequency_penalty: Annotated[float | None, Field(ge=-2, le=2)] = None
    repetition_penalty: Annotated[float | None, Field(gt=0, le=10)] = None  # vLLM extension
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id (as text) -> bias
    min_tokens: Annotated[int | None, Field(ge=0)] = None  # vLLM extension
    ignore_eos: bool | None = None  # vLLM extension: generate max_tokens tokens, for benchmarks
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None  # vLLM extension
    response_format: ResponseFormat | None = None
    user: str | None = None  # accepted and ignored, as by vLLM
    # vLLM extension: mixed into the prefix cache's block names, so that only requests with the
    # same salt share cached KV (another tenant cannot probe for a prompt by its TTFT).
    cache_salt: Annotated[str | None, Field(min_length=1, max_length=1024)] = None

    @property
    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens where given, else max_tokens; None: neither."""
        return self.max_completion_tokens or self.max_tokens

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key in bias or {}:
            # Not str.isdigit(): it accepts "²" and digit strings too long for int().
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"logit_bias keys must be token ids, got {key[:20]!r}")
        return bias


class ChatCompletionRequest(_GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)] = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: tool_choice "required" makes exactly one call
    # vLLM's: variables for the chat template, such as {"enable_thinking": false} for Qwen3
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's: continue the last (assistant) message instead of opening a new turn (a "prefill")
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class CompletionRequest(_GenerationRequest):
    # A string, a list of strings, a list of token ids, or a list of lists of token ids.
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS)] = None
    suffix: str | None = None
    best_of: Annotated[int | None, Field(ge=1)] = None


class LoadLoRARequest(_Lenient):
    """vLLM's POST /v1/load_lora_adapter."""

    lora_name: Annotated[str, Field(min_length=1, max_length=256)]
    lora_path: Annotated[str, Field(min_length=1, max_length=4096)]


class UnloadLoRARequest(_Lenient):
    """vLLM's POST /v1/unload_lora_adapter."""

    lora_name: Annotated[str, Field(min_length=1, max_length=256)]


class TokenizeRequest(_Lenient):
    """vLLM's /tokenize: either a prompt or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    request = _validate(ChatCompletionRequest, _object(body))
    if request.top_logprobs and not request.logprobs:
        raise APIError("top_logprobs requires logprobs to be true", param="top_logprobs")
    if isinstance(request.tool_choice, NamedToolChoice):
        names = [t.function.name for t in request.tools or ()]
        if request.tool_choice.function.name not in names:
            raise APIError(f"tool_choice names the function {request.tool_choice.function.name!r}, "
                           f"which is not among the tools ({', '.join(names) or 'none given'})", param="tool_choice")
    elif request.tool_choice == "required" and not request.tools:
        raise APIError('tool_choice "required" needs tools', param="tool_choice")
    if request.continue_final_message and (request.add_generation_prompt or request.messages[-1].role != "assistant"):
        raise APIError("continue_final_message continues a last assistant message, with add_generation_prompt "
                       "false", param="continue_final_message")
    if request.tools and request.response_format and request.response_format.type != "text":
        raise APIError("response_format cannot be combined with tools", param="response_format")
    return request


def parse_completion_request(body: Any) -> CompletionRequest:
    request = _validate(CompletionRequest, _object(body))
    if request.suffix:
        raise APIError("suffix is not supported: this server completes text only after the prompt", param="suffix")
    if request.best_of not in (None, request.n or 1):
        raise APIError("best_of must equal n: this server returns every choice it generates", param="best_of")
    prompt = request.prompt
    if prompt == [] or prompt == "" or (isinstance(prompt, list) and any(p in ("", []) for p in prompt)):
        raise APIError("prompt must not be empty", param="prompt")
    return request


def parse_request(model: type[BaseModel], body: Any) -> Any:
    return _validate(model, _object(body))


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    return body


def _validate(model: type[BaseModel], data: Any, prefix: str = "") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # For a field that takes several types, pydantic reports one error per type; the one
        # that got deepest into the value says best what is wrong (stop[0], not stop).
        worst = max(exc.errors(), key=lambda e: len(e["loc"]))
        param = _param_name(worst["loc"], prefix)
        raise APIError(f"{param}: {worst['msg']}" if param else worst["msg"], param=param or None) from None


_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param_name(loc: tuple, prefix: str) -> str:
    name = prefix
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part not in _UNION_TAGS and "[" not in part:  # skip pydantic's labels for union members
            name += f".{part}" if name else part
    return name
