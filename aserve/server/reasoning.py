"""A reasoning model's thinking, split from its answer: `<think>…</think>` text becomes
`reasoning_content` (chat), a `reasoning` item (Responses) or a `thinking` block (Messages),
and never reaches the content.

Two formats, looked up by name (`--reasoning-parser`), as vLLM names them:
  * `qwen3`: the thinking is there when the output starts with `<think>`, or when the prompt
    already opened it (templates that end the generation prompt with `<think>`). Otherwise,
    as with `enable_thinking: false`, the whole output is the answer.
  * `deepseek_r1`: the output is thinking from its first token (its template opens the tag),
    whether or not the model writes `<think>` again, up to `</think>`.
Thinking cut off by max_tokens (no `</think>`) is all reasoning and no answer. Leading newlines
of the reasoning and of the answer are dropped (the tags sit on lines of their own).

One streaming splitter serves both whole outputs and streams, so they cannot disagree: it
holds back only text that may still turn out to be part of a tag.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    always_thinks: bool  # deepseek_r1: the output is thinking until </think>, opened or not

    def stream(self, prompt_tail: str) -> ReasoningStream:
        """A splitter for one output of a prompt whose rendered text ends with `prompt_tail`."""
        opened = self.always_thinks or prompt_tail.rstrip().endswith(START)
        return ReasoningStream("reasoning" if opened else "start")

    def parse(self, prompt_tail: str, text: str) -> tuple[str | None, str]:
        """(reasoning, content) of a whole output; reasoning None when the model did not think."""
        stream = self.stream(prompt_tail)
        reasoning, content = stream.split(text, final=True)
        return (reasoning if stream.thought else None), content


class ReasoningStream:
    """Text in, ("reasoning" | "content", text) pieces out."""

    def __init__(self, state: str) -> None:
        self.state = state  # start (not known yet whether it thinks) | reasoning | content
        self.thought = state == "reasoning"
        self._may_open = self.thought  # opened by the prompt: a <think> the model writes anyway is dropped
        self._held = ""  # text that may be the start of a tag
        self._strip = True  # leading newlines of the current part are dropped

    def push(self, text: str) -> list[tuple[str, str]]:
        self._held += text
        out: list[tuple[str, str]] = []
        while True:
            held = self._held
            if self.state == "start":
                head = held.lstrip()
                if head.startswith(START):
                    self.state, self.thought, self._held, self._strip = "reasoning", True, head[len(START):], True
                    continue
                if START.startswith(head):  # "", "<", "<thi", ...: not known yet
                    return out
                self.state = "content"
                continue
            if self.state == "reasoning":
                if self._may_open:
                    head = held.lstrip()
                    if head.startswith(START):
                        self._held, self._may_open = head[len(START):], False
                        continue
                    if START.startswith(head):
                        return out
                    self._may_open = False
                if (end := held.find(END)) >= 0:
                    self._emit(out, "reasoning", held[:end])
                    self.state, self._held, self._strip = "content", held[end + len(END):], True
                    continue
                keep = _partial_suffix(held, END)
                self._emit(out, "reasoning", held[:len(held) - keep])
                self._held = held[len(held) - keep:]
                return out
            self._emit(out, "content", held)
            self._held = ""
            return out

    def split(self, text: str, final: bool) -> tuple[str, str]:
        """(reasoning, content) of the output's next text, joined; `final`: nothing follows it."""
        pieces = self.push(text) + (self.finish() if final else [])
        return ("".join(t for kind, t in pieces if kind == "reasoning"),
                "".join(t for kind, t in pieces if kind == "content"))

    def finish(self) -> list[tuple[str, str]]:
        """What is held back, at the end of the output."""
        out: list[tuple[str, str]] = []
        self._emit(out, "reasoning" if self.state == "reasoning" else "content", self._held)
        self._held = ""
        return out

    def _emit(self, out: list[tuple[str, str]], kind: str, text: str) -> None:
        if self._strip:
            text = text.lstrip("\n")
            if not text:
                return
            self._strip = False
        if text:
            out.append((kind, text))


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (held back: the tag may follow)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


REASONING_PARSERS: Mapping[str, ReasoningParser] = MappingProxyType({
    "qwen3": ReasoningParser("qwen3", always_thinks=False),
    "deepseek_r1": ReasoningParser("deepseek_r1", always_thinks=True),
})


def get_reasoning_parser(name: str | None) -> ReasoningParser | None:
    """The named parser; None for "" (no reasoning parser: thinking stays in the content)."""
    if not name:
        return None
    try:
        return REASONING_PARSERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; known parsers: {', '.join(REASONING_PARSERS)}") from None
