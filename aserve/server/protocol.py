"""The OpenAI request schema (validated with pydantic) and the response objects we send.

Liberal in what we accept: unknown fields are ignored and null means "not set". Strict
about types: a string where a number belongs is a 400, not a silent coercion.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from aserve.server.errors import APIError

MAX_STOP_STRINGS = 4


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

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


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float | None, Field(ge=0)] = None
    top_p: Annotated[float | None, Field(gt=0, le=1)] = None
    top_k: Annotated[int | None, Field(ge=-1)] = None  # vLLM extension; -1 or 0: off
    seed: int | None = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    stop: str | list[str] | None = None
    n: Annotated[int | None, Field(ge=1)] = None
    ignore_eos: bool | None = None  # vLLM extension: generate max_tokens tokens, for benchmarks

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


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    request = _validate(ChatCompletionRequest, body)
    if request.n not in (None, 1):
        raise APIError("only n=1 is supported", param="n")
    return request


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


# ---- responses ----


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(rid: str, model: str, created: int, text: str, finish_reason: str, use: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": use,
    }


def chat_chunk(
    rid: str, model: str, created: int, delta: dict, finish_reason: str | None, with_usage: bool
) -> dict:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None  # the spec: every chunk carries usage: null when the final one carries it
    return chunk


def usage_chunk(rid: str, model: str, created: int, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": use}


def model_list(model_id: str, max_model_len: int, created: int) -> dict:
    return {"object": "list", "data": [model_card(model_id, max_model_len, created)]}


def model_card(model_id: str, max_model_len: int, created: int) -> dict:
    # max_model_len is a vLLM extension field; clients use it to size prompts.
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "aserve",
        "max_model_len": max_model_len,
    }
