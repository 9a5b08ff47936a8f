"""Logprobs in OpenAI's two shapes: chat's (token, logprob, bytes, top_logprobs) and the
legacy completions one (tokens, token_logprobs, top_logprobs, text_offset)."""

import copy
import functools
import re
import threading
from collections.abc import Sequence
from typing import Any

from aserve.engine.sampler import TokenLogprobs

_FLOOR = -9999.0  # OpenAI's stand-in for "very unlikely"; JSON has no -inf
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: the byte a byte-level BPE vocab character stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(extra)}}


_BYTE_LEVEL = _byte_level_alphabet()


class TokenText:
    """A token's text and bytes, cached per id. A token that is part of a UTF-8 character
    decodes to U+FFFD alone; its bytes then come from the vocabulary entry itself.

    Each thread decodes with a tokenizer of its own: a Hugging Face tokenizer is one Rust object
    that the tokenize thread mutates while it encodes (truncation settings), and another thread
    using it at that moment fails ("Already borrowed"). The thread that makes this one (the event
    loop's, which renders logprobs) decodes with a private copy; any other thread with a copy of
    that. Copying and decoding only read it, and reads never conflict."""

    def __init__(self, tokenizer: Any) -> None:
        self._own = copy.deepcopy(tokenizer)
        self._owner = threading.get_ident()
        self._local = threading.local()
        self.text = functools.lru_cache(maxsize=65536)(self._text)
        self.bytes = functools.lru_cache(maxsize=65536)(self._bytes)

    @property
    def _tok(self) -> Any:
        if threading.get_ident() == self._owner:
            return self._own
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            tok = self._local.tokenizer = copy.deepcopy(self._own)
        return tok

    def _text(self, token: int) -> str:
        return self._tok.decode([token])

    def _bytes(self, token: int) -> list[int]:
        text = self.text(token)
        if "\ufffd" not in text:
            return list(text.encode())
        raw = self._tok.convert_ids_to_tokens(token) or ""
        if m := _BYTE_TOKEN.fullmatch(raw):
            return [int(m.group(1), 16)]
        if raw and all(c in _BYTE_LEVEL for c in raw):
            return [_BYTE_LEVEL[c] for c in raw]
        return list(text.encode())


def _lp(value: float) -> float:
    return max(value, _FLOOR)


def chat_logprobs(entries: Sequence[TokenLogprobs], tt: TokenText) -> dict:
    def item(token: int, logprob: float) -> dict:
        return {"token": tt.text(token), "logprob": _lp(logprob), "bytes": tt.bytes(token)}

    content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: Sequence[int], entries: Sequence[TokenLogprobs | None], tt: TokenText,
                        offset: int = 0) -> dict:
    """`entries[i]` describes `tokens[i]` (None for an echoed prompt's first token, which nothing
    predicts; OpenAI sends null there too). `offset`: text_offset of the first token."""
    texts = [tt.text(t) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": texts,
        "token_logprobs": [None if e is None else _lp(e.logprob) for e in entries],
        "top_logprobs": [None if e is None else _top_dict(e, tt) for e in entries],
        "text_offset": offsets,
    }


def _top_dict(entry: TokenLogprobs, tt: TokenText) -> dict[str, float]:
    top: dict[str, float] = {}
    for token, logprob in entry.top:
        top.setdefault(tt.text(token), _lp(logprob))  # two ids may spell the same text: keep the likelier
    return top
