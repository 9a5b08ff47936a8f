"""Specification of IncrementalDetokenizer (streamed text == non-streamed text, stop strings)."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from aserve.engine.detokenizer import DetokenizerOutput, IncrementalDetokenizer

CJK_EMOJI = "你好世界，巴黎是法国的首都。👋🌍🎉 一家人👨‍👩‍👧!"
ENGLISH = "Hello world, the capital of France is Paris."
CHAT_PREFIX = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def bpe(bpe_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_file(str(bpe_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def sp(sp_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_file(str(sp_tokenizer_dir / "tokenizer.json"))


@pytest.fixture(params=["bpe", "sp"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def chat_reply(tok: Tokenizer, reply: str) -> tuple[list[int], list[int]]:
    """Prompt ids and the ids a model would generate for `reply`: the tokens of the whole
    conversation after the prompt (a reply encoded on its own would gain a leading "▁")."""
    prompt, full = ids(tok, CHAT_PREFIX), ids(tok, CHAT_PREFIX + reply)
    assert full[: len(prompt)] == prompt
    return prompt, full[len(prompt) :]


def stream(det: IncrementalDetokenizer, gen_ids: list[int], step: int = 1) -> list[str]:
    """Feed `step` tokens per push like the engine does; return the non-empty pieces sent."""
    pieces = []
    for i in range(0, len(gen_ids), step):
        out = det.push(gen_ids[i : i + step])
        if out.text:
            pieces.append(out.text)
        if out.stopped:
            return pieces
    if tail := det.finish():
        pieces.append(tail)
    return pieces


# --- Rule 1: never a piece with U+FFFD from a character split over byte tokens -------------


def test_tiny_tokenizers_split_cjk_and_emoji_over_several_tokens(tok):
    # Precondition for the tests below: decoding token by token really does produce U+FFFD.
    naive = [tok.decode([i]) for i in ids(tok, CJK_EMOJI)]
    assert sum("\ufffd" in p for p in naive) >= 10


def test_cjk_and_emoji_streamed_one_token_at_a_time_never_yield_replacement_char(tok):
    prompt, gen = chat_reply(tok, CJK_EMOJI)
    pieces = stream(IncrementalDetokenizer(tok, prompt), gen)
    assert not [p for p in pieces if "\ufffd" in p]
    assert "".join(pieces) == CJK_EMOJI


def test_push_returns_empty_text_until_a_split_character_completes(sp):
    emoji_bytes = ids(sp, "👋")[1:]  # drop the leading "▁": four <0xNN> tokens
    assert len(emoji_bytes) == 4
    det = IncrementalDetokenizer(sp, ids(sp, CHAT_PREFIX))
    outs = [det.push([i]) for i in emoji_bytes]
    assert outs[:3] == [DetokenizerOutput("", False)] * 3
    assert outs[3] == DetokenizerOutput("👋", False)


def test_finish_drops_an_incomplete_trailing_character(bpe):
    gen = ids(bpe, "Hi 巴")
    det = IncrementalDetokenizer(bpe, ids(bpe, CHAT_PREFIX))
    pieces = [det.push([i]).text for i in gen[:-1]]  # the last byte of 巴 never arrives
    assert "".join(pieces) + det.finish() == "Hi "
    assert det.text == "Hi "


# --- Rule 2: concatenation == non-streamed decode, spaces included ---------------------------


def test_sentencepiece_single_token_decode_loses_spaces(sp):
    # Precondition: the naive per-token stream is "Helloworld,thecapital..." (lessons item 2).
    assert "".join(sp.decode([i]) for i in ids(sp, ENGLISH)) != ENGLISH


def test_sentencepiece_stream_keeps_spaces_between_words(sp):
    prompt, gen = chat_reply(sp, ENGLISH)
    pieces = stream(IncrementalDetokenizer(sp, prompt), gen)
    # Invariants, not the pieces themselves (those follow merges learned at test time): after each
    # token the stream so far is exactly the decode of the tokens so far, spaces included.
    assert len(pieces) == len(gen) > len(ENGLISH.split())
    assert ["".join(pieces[: k + 1]) for k in range(len(gen))] == [sp.decode(gen[: k + 1]) for k in range(len(gen))]
    assert "".join(pieces) == ENGLISH


@pytest.mark.parametrize("step", [1, 2, 5])
def test_stream_equals_non_streamed_decode_of_generated_ids(tok, step):
    prompt, gen = chat_reply(tok, ENGLISH + " " + CJK_EMOJI)
    gen.append(tok.token_to_id("<|im_end|>"))
    det = IncrementalDetokenizer(tok, prompt)
    assert "".join(stream(det, gen, step)) == tok.decode(gen, skip_special_tokens=True)


def test_first_generated_word_keeps_its_space_after_a_plain_prompt(sp):
    # The stream is the text the completion adds to the prompt (as in vLLM), so "is" + " Paris"
    # reads right; decoding the generated ids alone would strip the first "▁" to "Paris".
    prompt, gen = ids(sp, "The capital of France is"), ids(sp, " Paris. It is a big city")
    assert sp.decode(gen) == "Paris. It is a big city"
    assert sp.decode(prompt + gen) == "The capital of France is Paris. It is a big city"
    det = IncrementalDetokenizer(sp, prompt)
    assert "".join(stream(det, gen)) == " Paris. It is a big city"


def test_empty_prompt_streams_like_a_plain_decode(sp):
    gen = ids(sp, ENGLISH)
    assert "".join(stream(IncrementalDetokenizer(sp, []), gen)) == sp.decode(gen) == ENGLISH


def test_special_tokens_are_kept_when_not_skipped(bpe):
    gen = ids(bpe, "Hi") + [bpe.token_to_id("<|im_end|>")]
    det = IncrementalDetokenizer(bpe, ids(bpe, CHAT_PREFIX), skip_special_tokens=False)
    assert "".join(stream(det, gen)) == "Hi<|im_end|>"


@pytest.mark.parametrize("cut_chars", [0, 1, 2])
def test_prompt_ending_in_a_partial_character_never_leaks_prompt_text(tok, cut_chars):
    # The prompt stops inside 巴 (or 黎, 是); the character it starts is prompt, the rest output.
    text = "巴黎是法国的首都"
    all_ids = ids(tok, "Tell me: " + text)
    first_byte = next(i for i in range(len(all_ids)) if "\ufffd" in tok.decode(all_ids[: i + 1]))
    cut = first_byte + 3 * cut_chars + 1  # each of 巴黎是 is three single-byte tokens
    assert tok.decode(all_ids[:cut]).endswith("\ufffd")
    det = IncrementalDetokenizer(tok, all_ids[:cut])
    out = "".join(stream(det, all_ids[cut:]))
    assert out == text[cut_chars + 1 :]
    assert "Tell" not in out and "\ufffd" not in out


def test_only_a_window_of_recent_tokens_is_decoded_per_push(bpe):
    class CountingTokenizer:
        longest = 0

        def decode(self, token_ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(token_ids))
            return bpe.decode(token_ids, skip_special_tokens=skip_special_tokens)

    counting = CountingTokenizer()
    gen = ids(bpe, (ENGLISH + " " + CJK_EMOJI) * 20)
    det = IncrementalDetokenizer(counting, ids(bpe, ENGLISH * 20), stop=["never matches"])
    assert "".join(stream(det, gen)) == bpe.decode(gen)
    assert len(gen) > 500 and counting.longest <= 12


# --- Rule 3: stop strings ----------------------------------------------------------------


def test_stop_string_spanning_several_tokens_is_cut_exactly(tok):
    prompt, gen = chat_reply(tok, ENGLISH)
    det = IncrementalDetokenizer(tok, prompt, stop=["ital of Fr"])
    pieces, last = [], None
    for i in gen:
        last = det.push([i])
        pieces.append(last.text)
        if last.stopped:
            break
    assert last.stopped
    assert "".join(pieces) == det.text == "Hello world, the cap"


def test_stop_string_inside_a_single_token_is_cut_exactly(bpe):
    assert "Ġcapital" in bpe.encode(ENGLISH).tokens
    det = IncrementalDetokenizer(bpe, [], stop=["pit"])
    assert "".join(stream(det, ids(bpe, ENGLISH))) == "Hello world, the ca"


def test_stop_string_split_across_byte_tokens_of_cjk_text(tok):
    prompt, gen = chat_reply(tok, CJK_EMOJI)
    det = IncrementalDetokenizer(tok, prompt, stop=["首都"])
    assert "".join(stream(det, gen)) == "你好世界，巴黎是法国的"


def test_stop_prefix_is_never_streamed_before_the_stop_completes(bpe):
    # vllm#3574: "DEF", "G", "HI" leaked before "J" completed the stop "DEFGHIJ".
    det = IncrementalDetokenizer(bpe, [], stop=["DEFGHIJ"])
    sent = [det.push([i]).text for i in ids(bpe, "abc DEFGHIJ")]
    assert "".join(sent) == "abc "
    assert det.text == "abc "


def test_first_completed_stop_among_candidates_wins(tok):
    det = IncrementalDetokenizer(tok, [], stop=["Paris", "France", "capital", "world, the"])
    assert "".join(stream(det, ids(tok, ENGLISH))) == "Hello "


def test_stop_completing_first_wins_over_a_longer_one_starting_earlier(tok):
    # Generation would have ended when "of France" completed, before "capital of France is" could.
    det = IncrementalDetokenizer(tok, [], stop=["capital of France is", "of France"])
    assert "".join(stream(det, ids(tok, ENGLISH), step=3)) == "Hello world, the capital "


def test_pushes_after_a_stop_return_nothing(bpe):
    det = IncrementalDetokenizer(bpe, [], stop=["world"])
    gen = ids(bpe, ENGLISH)
    outs = [det.push([i]) for i in gen]
    assert [o.text for o in outs[:2]] == ["H", "ello "] and outs[1].stopped
    assert all(o.text == "" for o in outs[2:])
    assert det.finish() == ""
    assert det.text == "Hello "


def test_holdback_is_longest_stop_minus_one_and_releases_text_that_was_not_a_stop(bpe):
    det = IncrementalDetokenizer(bpe, [], stop=["Paris!", "x"])
    gen = ids(bpe, "Paris is nice")
    for n in range(1, len(gen) + 1):
        det.push(gen[n - 1 : n])
        decoded = bpe.decode(gen[:n])
        assert det.text == decoded[: max(len(decoded) - 5, 0)]
    assert det.finish() == " nice"
    assert det.text == "Paris is nice"


def test_without_stop_strings_nothing_is_held_back(bpe):
    det = IncrementalDetokenizer(bpe, [])
    assert [det.push([i]).text for i in ids(bpe, ENGLISH)] == [
        "Hello", " world", ",", " the", " capital", " of", " Fr", "ance", " is", " Par", "is", ".",
    ]
    assert det.finish() == ""


def test_finish_flushes_text_held_back_for_a_stop(tok):
    prompt, gen = chat_reply(tok, "Hello world")
    det = IncrementalDetokenizer(tok, prompt, stop=["zzzzz"])
    sent = "".join(det.push([i]).text for i in gen)
    assert sent == "Hello w"
    assert det.finish() == "orld"
    assert det.text == "Hello world"


def test_text_held_back_before_a_stop_is_sent_with_the_stopped_output(bpe):
    det = IncrementalDetokenizer(bpe, [], stop=["rld"])
    gen = ids(bpe, "Hello wo")
    assert "".join(det.push([i]).text for i in gen) == "Hello "
    assert det.push(ids(bpe, "rld")) == DetokenizerOutput("wo", True, "rld")  # names the stop string that matched
