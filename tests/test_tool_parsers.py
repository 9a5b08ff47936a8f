"""Specification of the tool-call parsers (Hermes/Qwen `<tool_call>` blocks -> OpenAI tool_calls)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from aserve.server.tool_parsers import TOOL_PARSERS, ToolCall, get_tool_parser, parser_for_template

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME = '<tool_call>{"name": "get_time", "arguments": {"tz": "Europe/Paris", "24h": true}}</tool_call>'


@pytest.fixture(scope="module")
def hermes():
    return get_tool_parser("hermes")


def name_args(calls: list[ToolCall]) -> list[tuple[str, Any]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_single_call_becomes_tool_call_with_json_string_arguments(hermes):
    content, calls = hermes.parse(WEATHER)
    assert content is None
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert calls[0].arguments == '{"city": "Paris"}'
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0].id)
    assert calls[0].to_openai() == {
        "id": calls[0].id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }


def test_two_calls_in_order_with_distinct_ids(hermes):
    content, calls = hermes.parse(WEATHER + "\n" + TIME)
    assert content is None
    assert name_args(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris", "24h": True})]
    assert calls[0].id != calls[1].id


def test_text_before_call_is_content_stripped(hermes):
    content, calls = hermes.parse("Let me check the weather.\n\n" + WEATHER + "\n")
    assert content == "Let me check the weather."
    assert name_args(calls) == [("get_weather", {"city": "Paris"})]


def test_whitespace_inside_content_between_text_and_call_is_kept(hermes):
    content, _ = hermes.parse("Checking. " + WEATHER + " Done.")
    assert content == "Checking.  Done."


def test_block_whitespace_and_key_order_vary(hermes):
    text = '<tool_call>  \n\t{"arguments": {"q": "été"},\n "name": "search"}   </tool_call>'
    content, calls = hermes.parse(text)
    assert content is None
    assert calls[0].name == "search"
    assert calls[0].arguments == '{"q": "été"}'  # ensure_ascii=False, as OpenAI sends


def test_invalid_json_block_stays_text_verbatim(hermes):
    bad = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>'
    assert hermes.parse("Sure. " + bad) == ("Sure. " + bad, [])


def test_invalid_block_stays_text_while_valid_one_is_a_call(hermes):
    bad = "<tool_call>not json</tool_call>"
    content, calls = hermes.parse(bad + "\n" + WEATHER)
    assert content == bad
    assert name_args(calls) == [("get_weather", {"city": "Paris"})]


def test_json_missing_name_stays_text(hermes):
    block = '<tool_call>{"arguments": {"city": "Paris"}}</tool_call>'
    assert hermes.parse(block) == (block, [])


@pytest.mark.parametrize(
    "body",
    [
        '{"name": 42, "arguments": {}}',
        '{"name": "f", "arguments": [1, 2]}',
        '{"name": "f"}',
        '{"name": "f", "arguments": "not json"}',
        '{"name": "f", "arguments": {"x": NaN}}',
        '["f", {}]',
    ],
)
def test_json_of_wrong_shape_stays_text(hermes, body):
    block = f"<tool_call>{body}</tool_call>"
    assert hermes.parse(block) == (block, [])


def test_unterminated_block_with_partial_json_stays_text(hermes):
    text = 'One moment.\n<tool_call>\n{"name": "get_weather", "argum'
    assert hermes.parse(text) == (text, [])


def test_unterminated_block_with_complete_call_is_accepted(hermes):
    content, calls = hermes.parse('One moment.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n')
    assert content == "One moment."
    assert name_args(calls) == [("get_weather", {"city": "Paris"})]


def test_arguments_given_as_json_string(hermes):
    _, calls = hermes.parse('<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>')
    assert calls[0].arguments == '{"city": "Paris"}'


def test_parameters_is_a_synonym_for_arguments(hermes):
    _, calls = hermes.parse('<tool_call>{"name": "get_weather", "parameters": {"city": "Paris"}}</tool_call>')
    assert name_args(calls) == [("get_weather", {"city": "Paris"})]


def test_no_calls_gives_empty_string_content_not_none(hermes):
    assert hermes.parse("  ") == ("", [])


# --- streaming -------------------------------------------------------------------------

OUTPUTS = [
    WEATHER,
    "Let me check the weather.\n\n" + WEATHER + "\n",
    WEATHER + "\n" + TIME,
    "Checking. " + WEATHER + " Done.",
    "Sure. <tool_call>not json</tool_call>\n" + TIME + "\n",
    'One moment.\n<tool_call>\n{"name": "get_weather", "argum',
    'One moment.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n',
    "Use the <tool> element, or <tool_call or </tool_call> as text. a <tool",
    "  \n  Hello world  \n  ",
    "<tool_call><tool_call>" + TIME[len("<tool_call>") :] + "<",
    '<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"été 🌍\\"}"}</tool_call>',
]


def assemble(deltas: list[dict[str, Any]]) -> tuple[str, list[tuple[str, str, str]]]:
    """Concatenate a stream's deltas as an OpenAI client does: content, and (id, name, arguments) per index."""
    content = ""
    calls: list[list[str]] = []
    for d in deltas:
        assert d, "empty delta"
        if "content" in d:
            assert d["content"], "empty content delta"
            content += d["content"]
        for tc in d.get("tool_calls", []):
            if "id" in tc:  # the head fragment opens the next index
                assert tc["index"] == len(calls) and tc["type"] == "function" and tc["function"]["arguments"] == ""
                calls.append([tc["id"], tc["function"]["name"], ""])
            else:
                assert tc["index"] == len(calls) - 1
                calls[tc["index"]][2] += tc["function"]["arguments"]
    return content, [tuple(c) for c in calls]


def stream(text: str, size: int, parser: str = "hermes") -> tuple[list[dict[str, Any]], list[ToolCall]]:
    sp = get_tool_parser(parser).streaming()
    deltas = [d for i in range(0, len(text), size) for d in sp.push(text[i : i + size])]
    deltas += sp.finish()
    return deltas, sp.calls


@pytest.mark.parametrize("text", OUTPUTS)
def test_streaming_every_split_size_matches_parse(hermes, text):
    want_content, want_calls = hermes.parse(text)
    for size in range(1, len(text) + 1):
        deltas, calls = stream(text, size)
        content, streamed = assemble(deltas)
        assert content == (want_content or ""), size  # exactly parse()'s content: stripped the same way
        assert [(n, a) for _, n, a in streamed] == [(c.name, c.arguments) for c in want_calls], size
        assert [(c.id, c.name, c.arguments) for c in calls] == streamed, size


def test_streaming_tag_split_across_pushes_holds_until_decided():
    sp = get_tool_parser("hermes").streaming()
    assert sp.push("Hi <tool") == [{"content": "Hi"}]  # "<tool" may be the tag; the space waits for text
    assert sp.push("_ca") == []
    assert sp.push('ll>{"name": "f", "arguments": {}}</tool') == []
    head, args = sp.push("_call>")
    assert head == {"tool_calls": [{"index": 0, "id": sp.calls[0].id, "type": "function",
                                    "function": {"name": "f", "arguments": ""}}]}
    assert args == {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}
    assert sp.finish() == []


def test_streaming_text_mentioning_tool_is_released_once_it_is_not_the_tag():
    sp = get_tool_parser("hermes").streaming()
    assert sp.push("the <tool") == [{"content": "the"}]
    assert sp.push("> tag") == [{"content": " <tool> tag"}]
    assert sp.push(" <tool") == []
    assert sp.finish() == [{"content": " <tool"}]
    assert sp.calls == []


def test_streaming_unterminated_invalid_block_flushed_as_content_at_finish():
    sp = get_tool_parser("hermes").streaming()
    assert sp.push('<tool_call>{"name": "f", "argu') == []
    assert sp.finish() == [{"content": '<tool_call>{"name": "f", "argu'}]


def test_qwen_is_an_alias_of_hermes():
    assert get_tool_parser("qwen").parse(WEATHER)[1][0].name == "get_weather"


def test_unknown_parser_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown tool parser 'llama3'.*hermes, llama3_json, mistral, qwen"):
        get_tool_parser("llama3")


def test_registry_is_immutable():
    with pytest.raises(TypeError):
        TOOL_PARSERS["mine"] = lambda: None  # type: ignore[index]


# ---------------------------------------------------------------------------- Llama 3.x and Mistral

LLAMA_CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
MISTRAL_CALLS = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]'


@pytest.mark.parametrize("text", [
    "<|python_tag|>" + LLAMA_CALL,
    LLAMA_CALL,  # <|python_tag|> is a special token: skipped special tokens leave the bare JSON
    "  \n" + LLAMA_CALL + "\n",
])
def test_a_llama3_call_is_json_after_the_python_tag_or_the_whole_answer(text):
    content, calls = get_tool_parser("llama3_json").parse(text)
    assert content is None and name_args(calls) == [("get_weather", {"city": "Paris"})]


def test_llama3_calls_separated_by_semicolons_come_in_order():
    text = "<|python_tag|>" + LLAMA_CALL + '; {"name": "get_time", "arguments": {"tz": "UTC"}}'
    assert name_args(get_tool_parser("llama3_json").parse(text)[1]) == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]


@pytest.mark.parametrize("text", ["The weather is fine.", "{not json at all}", '{"name": "f"} and then text',
                                  '{"city": "Paris"}'])
def test_llama3_text_that_is_not_only_calls_stays_content(text):
    assert get_tool_parser("llama3_json").parse(text) == (text, [])


@pytest.mark.parametrize("text", ["[TOOL_CALLS]" + MISTRAL_CALLS, MISTRAL_CALLS, "Let me look. [TOOL_CALLS]" + MISTRAL_CALLS])
def test_mistral_calls_are_a_json_array_after_its_marker(text):
    content, calls = get_tool_parser("mistral").parse(text)
    assert content == ("Let me look." if text.startswith("Let") else None)
    assert name_args(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("text", ["[1, 2, 3]", "[TOOL_CALLS] not json", "Plain [text] answer."])
def test_mistral_output_that_is_not_calls_stays_content(text):
    assert get_tool_parser("mistral").parse(text) == (text, [])


MARKED_OUTPUTS = {
    "llama3_json": ["<|python_tag|>" + LLAMA_CALL, LLAMA_CALL, "Hello there", "{oops", "Text <|python_tag|>" + LLAMA_CALL,
                    "Text <|python_ta", "<|python_tag|>" + LLAMA_CALL + "; " + LLAMA_CALL],
    "mistral": ["[TOOL_CALLS]" + MISTRAL_CALLS, MISTRAL_CALLS, "Sure. [TOOL_CALLS]" + MISTRAL_CALLS, "[TOOL_CALLS] broken",
                "no calls [TOOL", "  [1, 2]  "],
}


@pytest.mark.parametrize(("parser", "text"), [(p, t) for p, texts in MARKED_OUTPUTS.items() for t in texts])
def test_marked_json_streaming_every_split_size_matches_parse(parser, text):
    want_content, want_calls = get_tool_parser(parser).parse(text)
    for size in range(1, len(text) + 1):
        deltas, calls = stream(text, size, parser)
        content, streamed = assemble(deltas)
        assert content == (want_content or ""), size
        assert [(n, a) for _, n, a in streamed] == [(c.name, c.arguments) for c in want_calls], size
        assert [(c.id, c.name, c.arguments) for c in calls] == streamed, size


@pytest.mark.parametrize(("template", "parser"), [
    ("{{ bos_token }}[INST] ... [TOOL_CALLS] {{ tool_calls | tojson }}", "mistral"),
    ("[TOOL_CALLS]{{ call.name }}[ARGS]{{ call.arguments }}", "hermes"),  # not a JSON array: not mistral's
    ("<|start_header_id|>ipython<|end_header_id|> ... <|python_tag|>", "llama3_json"),
    ("{% for m in messages %}<|im_start|>{{ m.role }} ... <tool_call>", "hermes"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "hermes"),  # no tools: aserve's own prompt asks for Hermes
    (None, "hermes"),
])
def test_auto_picks_the_format_the_chat_template_teaches(template, parser):
    assert parser_for_template(template) == parser
