"""Chat and completions response objects and stream chunks, shaped as OpenAI's (checked against its spec in tests)."""

from typing import Any

def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # As OpenAI reports it: prompt tokens whose keys/values came from the prefix cache.
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_completion(rid: str, model: str, created: int, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": use}


def chat_choice(index: int, content: str | None, finish_reason: str, logprobs: dict | None = None,
                tool_calls: list[dict] | None = None, reasoning: str | None = None) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning is not None:  # vLLM's two names for the thinking (reasoning_content, and reasoning since)
        message["reasoning_content"] = message["reasoning"] = reasoning
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None,
               with_usage: bool, logprobs: dict | None = None) -> dict:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }
    if with_usage:
        chunk["usage"] = None  # the spec: every chunk carries usage: null when the final one carries it
    return chunk


def completion(rid: str, model: str, created: int, choices: list[dict], use: dict | None) -> dict:
    """A text_completion: the whole response, or one stream chunk (the same shape, as OpenAI sends)."""
    body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if use is not None:
        body["usage"] = use
    return body


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def usage_chunk(rid: str, model: str, created: int, use: dict, obj: str = "chat.completion.chunk") -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_list(model_id: str, max_model_len: int, created: int, adapters: dict[str, str]) -> dict:
    """The base model, then each LoRA adapter (name -> path) as its own model, as vLLM lists them."""
    return {"object": "list", "data": [model_card(model_id, max_model_len, created)] + [
        model_card(name, max_model_len, created, parent=model_id, root=path) for name, path in adapters.items()]}


def model_card(model_id: str, max_model_len: int, created: int, parent: str | None = None,
               root: str | None = None) -> dict:
    # max_model_len, root and parent are vLLM's extension fields: clients size prompts with the
    # first; an adapter's parent is the base model's id and its root the adapter's path.
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": "aserve",
        "root": root or model_id,
        "parent": parent,
        "max_model_len": max_model_len,
    }
