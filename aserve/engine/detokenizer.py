"""Incremental detokenization with stop strings, one instance per request.

It runs on the event loop once per batch of new tokens, so each push decodes only a short
window of recent tokens (vLLM's prefix_offset/read_offset algorithm), never the whole output.
Decoding the window with the preceding tokens as context keeps the leading space that
SentencePiece decoders strip from a lone token, and text is released only once its last
character is complete, so a CJK character or emoji split over byte tokens never streams as U+FFFD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import tokenizers

_FFFD = "\ufffd"
_CONTEXT = 5  # prompt tokens decoded as context for the first generated token (vLLM uses 5)
_MAX_CHAR_TOKENS = 4  # a UTF-8 character is at most 4 bytes, so at most 4 byte tokens


@dataclass(slots=True)
class DetokenizerOutput:
    text: str  # new text that is safe to send now ("" if nothing yet)
    stopped: bool  # a stop string matched: `text` ends right before it; nothing more will be emitted
    stop: str | None = None  # the stop string that matched


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        prompt_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = [s for s in stop if s]
        # A stop string can complete only in text whose last len(s)-1 chars are still unsent.
        self._holdback = max(map(len, self._stop), default=1) - 1
        self._pending = ""  # decoded but held back for a possible stop string
        self._pieces: list[str] = []
        self._done = False
        self._stopped = False
        self.matched_stop: str | None = None  # the stop string that matched, once one has
        context, tail = self._split_prompt(list(prompt_ids[-(_CONTEXT + 2 * _MAX_CHAR_TOKENS) :]))
        self._ids = context + tail
        self._prefix, self._read = 0, len(self._ids)
        # Characters of the decoded window that belong to the prompt. A character the prompt
        # starts and the first generated token completes counts as prompt (as in vLLM), so
        # no prompt text ever leaks into the output.
        self._prefix_len = len(self._decode(context))
        self._straddle = bool(tail)
        if tail:
            self._prefix_len += len(self._decode(tail).rstrip(_FFFD)) + 1

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip_special) if ids else ""

    def _split_prompt(self, ids: list[int]) -> tuple[list[int], list[int]]:
        """Pick the context window (starting and ending on character boundaries) and the
        trailing tokens of an incomplete last prompt character.

        Both ends matter for ByteFallback decoders: they turn a whole run of <0xNN> tokens into
        U+FFFDs when the run is not valid UTF-8, so a window cut inside a character would
        poison every later byte token of the run.
        """
        n = len(ids)
        for k in range(min(_MAX_CHAR_TOKENS, n) + 1):
            end = n - k
            first = max(end - _CONTEXT, 0)
            for start in range(first, max(first - _MAX_CHAR_TOKENS, -1), -1):
                text = self._decode(ids[start:end])
                if not (text.startswith(_FFFD) or text.endswith(_FFFD)):
                    return ids[start:end], ids[end:]
        return [], []  # undecodable prompt tail: generate without context

    def push(self, token_ids: Sequence[int]) -> DetokenizerOutput:
        if self._done:
            return DetokenizerOutput("", self._stopped)
        self._ids.extend(token_ids)
        new_text = self._decode(self._ids[self._prefix :])
        # Hold everything while the window ends in an incomplete character.
        if len(new_text) <= self._prefix_len or new_text.endswith(_FFFD):
            return DetokenizerOutput("", False)
        if not self._straddle:  # right after a partial prompt character, read is mid-character
            self._prefix = self._read
        delta = self._take(new_text)
        self._read = len(self._ids)
        self._prefix_len = len(self._decode(self._ids[self._prefix : self._read]))
        del self._ids[: self._prefix]  # keep only the window; the engine owns the full output
        self._read -= self._prefix
        self._prefix = 0
        return self._release(delta, final=False)

    def finish(self) -> str:
        """The request ended (EOS/length): return everything still held back."""
        if self._done:
            return ""
        # An incomplete trailing character can never complete now: drop it.
        delta = self._take(self._decode(self._ids[self._prefix :])).rstrip(_FFFD)
        out = self._release(delta, final=True).text
        self._done = True
        return out

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def _take(self, new_text: str) -> str:
        delta = new_text[self._prefix_len :]
        if self._straddle:
            # Garbage bytes after a prompt's partial character decode to one U+FFFD per byte
            # under ByteFallback; they belong to that character, not to the output.
            delta, self._straddle = delta.lstrip(_FFFD), False
        return delta

    def _release(self, delta: str, final: bool) -> DetokenizerOutput:
        # Everything before the pending text was searched already, and the holdback keeps
        # any partial stop match inside the pending text, so only pending+delta is searched.
        # The match that completes first wins (generation would have stopped there), so the
        # result does not depend on how tokens were batched into pushes.
        buf = self._pending + delta
        hits = [(i + len(s), i, s) for s in self._stop if (i := buf.find(s)) >= 0]
        if hits:
            _, start, self.matched_stop = min(hits)
            out, self._pending = buf[:start], ""
            self._stopped = self._done = True
        else:
            keep = 0 if final else min(self._holdback, len(buf))
            out, self._pending = buf[: len(buf) - keep], buf[len(buf) - keep :]
        if out:
            self._pieces.append(out)
        return DetokenizerOutput(out, self._stopped, self.matched_stop)
