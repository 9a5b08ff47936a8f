"""Tool calls out of a chat model's generated text, as OpenAI `tool_calls`.

One parser per model family, looked up by name (`get_tool_parser`), or chosen from the chat
template (`parser_for_template`, what `--tool-parser auto` does). Llama 3.x writes a call as
JSON, after `<|python_tag|>` or as the whole answer (`llama3_json`); Mistral as a JSON array
after `[TOOL_CALLS]` (`mistral`); both are read by `MarkedJSONToolParser` below. Hermes /
Qwen 2.5+ / Qwen3, and aserve's own tool prompt for templates that render no tools, write each
call as a block

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

possibly several, possibly after some text. Unlike vLLM's hermes parser, which gives up
on the whole output when one block is bad, each block is judged on its own: a block that
is not a valid call stays in the content, verbatim, so nothing the model wrote is lost.

Rules shared by `parse()` and the streaming parser (tests hold them to the same result):
  * a block is a valid call when its body is JSON (standard JSON: no NaN/Infinity) for an
    object with a non-empty string "name" and an "arguments" (or, as vLLM accepts,
    "parameters") that is an object or a JSON string encoding an object;
  * an unterminated block at the end of the output is a call only if its body is a
    complete valid call (the model stopped right before the close tag), else text;
  * a block ends at the first close tag after its open tag; an open tag inside a block
    body does not start a new block (the body is then not JSON, so the block is text);
  * whitespace: the content is the text outside the valid calls, verbatim, with only its
    leading and trailing whitespace stripped (whitespace between text and a call, inside
    the text, is kept). The stream sends exactly that string: it drops leading whitespace
    and holds a whitespace run until non-whitespace content follows it.
  * call ids are OpenAI style, "call_" + 24 lowercase hex characters (random, 96 bits).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol


log = logging.getLogger("aserve.server")


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class StreamingToolParser(Protocol):
    def push(self, delta: str) -> list[dict[str, Any]]: ...
    def finish(self) -> list[dict[str, Any]]: ...
    @property
    def calls(self) -> list[ToolCall]: ...


class ToolParser(Protocol):
    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]: ...
    def streaming(self) -> StreamingToolParser: ...


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def _reject_constant(name: str) -> Any:
    # NaN/Infinity are not JSON: json.dumps would echo them and the client's parser would fail
    raise ValueError(f"{name} is not valid JSON")


def decode_call(body: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) when a block body is a valid call, else None."""
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except ValueError:  # JSONDecodeError is a ValueError
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    if isinstance(args, str):  # some models double-encode: "arguments": "{\"city\": \"Paris\"}"
        try:
            args = json.loads(args, parse_constant=_reject_constant)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return name, json.dumps(args, ensure_ascii=False)


def _held_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`: what may still become the tag."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-k:]):
            return k
    return 0


@dataclass(frozen=True, slots=True)
class TaggedJSONToolParser:
    """Calls written as `<open>{json}</close>` blocks (Hermes, Qwen). Stateless: one serves all requests."""

    open_tag: str
    close_tag: str

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        pieces: list[str] = []
        calls: list[ToolCall] = []
        pos = 0
        while (start := text.find(self.open_tag, pos)) != -1:
            body_start = start + len(self.open_tag)
            end = text.find(self.close_tag, body_start)
            block_end = len(text) if end == -1 else end + len(self.close_tag)
            decoded = decode_call(text[body_start : len(text) if end == -1 else end])
            if decoded is None:
                pieces.append(text[pos:block_end])  # not a call: the block stays as written
            else:
                pieces.append(text[pos:start])
                calls.append(ToolCall(new_call_id(), *decoded))
            pos = block_end
        pieces.append(text[pos:])
        content = "".join(pieces).strip()
        return (content or None) if calls else content, calls

    def streaming(self) -> TaggedJSONStreamingParser:
        return TaggedJSONStreamingParser(self)


@dataclass(slots=True)
class _ContentSink:
    """Turns the raw content pieces into what to send so the total is `"".join(pieces).strip()`."""

    started: bool = False
    pending_ws: str = ""  # trailing whitespace held until non-whitespace follows (or dropped at the end)

    def write(self, text: str) -> str:
        text = self.pending_ws + text
        if not self.started:
            text = text.lstrip()
        body = text.rstrip()
        self.pending_ws = text[len(body) :]
        if body:
            self.started = True
        return body


class _StreamedCalls:
    """What the streaming parsers share: their calls so far, and no push after finish()."""

    __slots__ = ()

    @property
    def calls(self) -> list[ToolCall]:
        return list(self._calls)

    def _take(self, delta: str) -> list[dict[str, Any]]:
        if self._done:
            raise RuntimeError("push() after finish()")
        self._buf += delta
        return []

    def _finishing(self) -> list[dict[str, Any]] | None:
        """The list finish() fills; None when it has run already."""
        if self._done:
            return None
        self._done = True
        return []

    def _release_text(self, tag: str, out: list[dict[str, Any]]) -> None:
        """Sends the held text as content, but for an end that may still become `tag`."""
        keep = _held_prefix_len(self._buf, tag)
        _emit_content(self._sink, self._buf[: len(self._buf) - keep], out)
        self._buf = self._buf[len(self._buf) - keep :]


@dataclass(slots=True)
class TaggedJSONStreamingParser(_StreamedCalls):
    """Per-request state for streaming one output through a TaggedJSONToolParser.

    Text streams as soon as it cannot be the start of an open tag; a block is held whole
    until its close tag (or the end of the output) decides whether it is a call.
    """

    parser: TaggedJSONToolParser
    _buf: str = ""  # text: the held possible tag prefix; in a block: the body so far
    _in_block: bool = False
    _scan_from: int = 0  # in a block: where the close tag search resumes (keeps 1-char pushes linear)
    _done: bool = False
    _sink: _ContentSink = field(default_factory=_ContentSink)
    _calls: list[ToolCall] = field(default_factory=list)

    def push(self, delta: str) -> list[dict[str, Any]]:
        out = self._take(delta)
        open_tag, close_tag = self.parser.open_tag, self.parser.close_tag
        while True:
            if self._in_block:
                end = self._buf.find(close_tag, self._scan_from)
                if end == -1:
                    self._scan_from = max(0, len(self._buf) - len(close_tag) + 1)
                    break
                self._end_block(self._buf[:end], closed=True, out=out)
                self._buf = self._buf[end + len(close_tag) :]
            else:
                start = self._buf.find(open_tag)
                if start == -1:
                    self._release_text(open_tag, out)
                    break
                self._content(self._buf[:start], out)
                self._buf = self._buf[start + len(open_tag) :]
                self._in_block, self._scan_from = True, 0
        return out

    def finish(self) -> list[dict[str, Any]]:
        if (out := self._finishing()) is None:
            return []
        if self._in_block:
            self._end_block(self._buf, closed=False, out=out)
        else:
            self._content(self._buf, out)  # a held "<tool" that never became the tag
        self._buf = ""
        return out  # the sink's held trailing whitespace is dropped: the content is stripped

    def _end_block(self, body: str, *, closed: bool, out: list[dict[str, Any]]) -> None:
        self._in_block = False
        decoded = decode_call(body)
        if decoded is None:
            raw = self.parser.open_tag + body + (self.parser.close_tag if closed else "")
            self._content(raw, out)
            return
        _emit_call(ToolCall(new_call_id(), *decoded), self._calls, out)

    def _content(self, text: str, out: list[dict[str, Any]]) -> None:
        _emit_content(self._sink, text, out)


def _emit_call(call: ToolCall, calls: list[ToolCall], out: list[dict[str, Any]]) -> None:
    index = len(calls)
    calls.append(call)
    # OpenAI's shape: the first fragment names the call, later ones append to its arguments
    head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
    out.append({"tool_calls": [head]})
    out.append({"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]})


def _emit_content(sink: _ContentSink, text: str, out: list[dict[str, Any]]) -> None:
    send = sink.write(text)
    if not send:  # never an empty delta
        return
    if out and "content" in out[-1]:  # one delta for adjacent content (e.g. text, then an invalid block)
        out[-1]["content"] += send
    else:
        out.append({"content": send})


def _json_values(body: str, separators: str) -> list[Any] | None:
    """The JSON values `body` consists of, separated by whitespace and `separators`; None if
    anything else is in it."""
    decoder, values, pos = json.JSONDecoder(parse_constant=_reject_constant), [], 0
    while True:
        while pos < len(body) and (body[pos].isspace() or body[pos] in separators):
            pos += 1
        if pos == len(body):
            return values
        try:
            value, pos = decoder.raw_decode(body, pos)
        except ValueError:
            return None
        values.append(value)


@dataclass(frozen=True, slots=True)
class MarkedJSONToolParser:
    """Calls written as JSON after a marker: Llama 3.x (`<|python_tag|>` then one or more
    objects, `;`-separated) and Mistral (`[TOOL_CALLS]` then an array of objects). The marker is
    a special token, gone when special tokens are skipped: output that *starts* with the JSON
    (`bare_start`) is read as calls too. Text before a marker is content; what follows it is
    calls only if all of it is valid calls (else it stays content, verbatim, as with Hermes)."""

    marker: str
    bare_start: str  # "{" (Llama) or "[" (Mistral)
    array: bool  # the calls are one JSON array (Mistral), else a sequence of objects (Llama)

    def calls_in(self, body: str) -> list[ToolCall] | None:
        values = _json_values(body, "" if self.array else ";")
        if self.array:
            values = values[0] if values is not None and len(values) == 1 and isinstance(values[0], list) else None
        if not values:
            return None
        decoded = [decode_call(json.dumps(v)) if isinstance(v, dict) else None for v in values]
        if any(d is None for d in decoded):
            return None
        return [ToolCall(new_call_id(), *d) for d in decoded]

    def split(self, text: str) -> tuple[str, str] | None:
        """(text before, calls' body) where the output holds calls' JSON, else None."""
        at = text.find(self.marker)
        if at != -1:
            return text[:at], text[at + len(self.marker) :]
        if text.lstrip().startswith(self.bare_start):
            return "", text
        return None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        parts = self.split(text)
        calls = self.calls_in(parts[1]) if parts is not None else None
        if not calls:
            return text.strip(), []
        return parts[0].strip() or None, calls

    def streaming(self) -> MarkedJSONStreamingParser:
        return MarkedJSONStreamingParser(self)


@dataclass(slots=True)
class MarkedJSONStreamingParser(_StreamedCalls):
    """Streams text until the marker (or, at the very start, the bare JSON opening) appears;
    from there holds everything, and decides at the end whether it was calls."""

    parser: MarkedJSONToolParser
    _buf: str = ""  # text held: a possible marker prefix, or (holding) the calls' body so far
    _holding: bool = False
    _started: bool = False  # non-whitespace seen
    _done: bool = False
    _sink: _ContentSink = field(default_factory=_ContentSink)
    _calls: list[ToolCall] = field(default_factory=list)

    def push(self, delta: str) -> list[dict[str, Any]]:
        out = self._take(delta)
        if self._holding:
            return out
        marker = self.parser.marker
        if not self._started:
            head = self._buf.lstrip()
            if not head:
                return out
            self._started = True
            if head.startswith(self.parser.bare_start):
                self._holding = True
                return out
        if (at := self._buf.find(marker)) != -1:
            _emit_content(self._sink, self._buf[:at], out)
            self._buf, self._holding = self._buf[at:], True
            return out
        self._release_text(marker, out)
        return out

    def finish(self) -> list[dict[str, Any]]:
        if (out := self._finishing()) is None:
            return []
        parts = self.parser.split(self._buf) if self._holding else None
        calls = self.parser.calls_in(parts[1]) if parts is not None else None
        if calls:
            _emit_content(self._sink, parts[0], out)
            for call in calls:
                _emit_call(call, self._calls, out)
        else:
            _emit_content(self._sink, self._buf, out)
        self._buf = ""
        return out


_HERMES = TaggedJSONToolParser("<tool_call>", "</tool_call>")
_LLAMA3 = MarkedJSONToolParser("<|python_tag|>", "{", array=False)
_MISTRAL = MarkedJSONToolParser("[TOOL_CALLS]", "[", array=True)

# name -> factory; the parsers are stateless, so the factories hand out one shared instance
TOOL_PARSERS: Mapping[str, Callable[[], ToolParser]] = MappingProxyType(
    {
        "hermes": lambda: _HERMES,
        "qwen": lambda: _HERMES,  # Qwen 2.5 / Qwen3 chat templates use the Hermes format
        "llama3_json": lambda: _LLAMA3,  # vLLM's name
        "mistral": lambda: _MISTRAL,
    }
)


def parser_for_template(template: str | None) -> str:
    """The parser for the call format a chat template teaches its model (`--tool-parser auto`).
    Hermes also covers templates that render no tools: aserve's own tool prompt asks for it."""
    template = template or ""
    if "[TOOL_CALLS]" in template:
        if "[ARGS]" not in template:
            return "mistral"
        log.warning("the chat template writes tool calls as [TOOL_CALLS]name[ARGS]{...}, which no parser here "
                    "reads; tool calls will come back as text (--tool-parser picks another)")
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return "hermes"


def get_tool_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name.lower()]()
    except KeyError:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"unknown tool parser {name!r}; known parsers: {known}") from None
