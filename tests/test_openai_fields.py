"""OpenAI API completeness, over raw HTTP against the real app on the tiny random-weight Llama:
/v1/completions, n, logprobs, penalties, logit_bias, stop_token_ids, min_tokens, tools,
response_format, /tokenize, generation_config defaults, chat templates. Every response and
chunk is checked against OpenAI's schemas; each field has a test that fails if it is ignored.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import jsonschema
import pytest
import pytest_asyncio
from openapi_schema import assert_valid
from test_api import HELLO, Server, chat, parse_sse, post, serve, stream, text_of

from aserve.engine.model_runner import StepOutput
from aserve.server import protocol
from aserve.server.chat import forced_calls, forced_tool_schema

pytestmark = pytest.mark.asyncio(loop_scope="module")

COMPLETIONS = "/v1/completions"
GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny_llama_dir) -> AsyncIterator[Server]:
    async with serve(tiny_llama_dir) as s:
        yield s


@pytest_asyncio.fixture(loop_scope="module")
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def assert_valid_completion(body: dict) -> None:
    """OpenAI's spec types a completion choice's finish_reason as a string and token_logprobs
    as numbers, but its API sends null for both where nothing applies (a stream chunk before
    the last; an echoed prompt's first token), as vLLM does: only those nulls are let through."""
    patched = json.loads(json.dumps(body))
    for choice in patched["choices"]:
        if choice["finish_reason"] is None:
            choice["finish_reason"] = "length"
        if choice["logprobs"] is not None:
            lp = choice["logprobs"]
            lp["token_logprobs"] = [0.0 if v is None else v for v in lp["token_logprobs"]]
            lp["top_logprobs"] = [{} if v is None else v for v in lp["top_logprobs"]]
    assert_valid("CreateCompletionResponse", patched)


async def complete(client: aiohttp.ClientSession, server: Server, **body) -> dict:
    reply = await post(client, server.url, {"model": server.model, **body}, path=COMPLETIONS)
    assert reply.status == 200, reply.body
    assert_valid_completion(reply.body)
    return reply.body


async def complete_stream(client: aiohttp.ClientSession, server: Server, **body) -> list[dict]:
    async with client.post(server.url + COMPLETIONS, json={"model": server.model, "stream": True, **body}) as resp:
        raw = await resp.read()
        assert resp.status == 200, raw
    chunks = [json.loads(d) for d in parse_sse(raw)[:-1]]
    for chunk in chunks:
        assert "error" not in chunk, chunk
        assert_valid_completion(chunk)
    return chunks


def assert_spells(tokens: list[str], text: str) -> None:
    """The tokens spell the text. A token that is part of a UTF-8 character shows as U+FFFD
    alone, and a character cut off at the end is not in the text: only whole tokens are checked."""
    pos = 0
    for token in tokens:
        if "\ufffd" not in token:
            pos = text.index(token, pos) + len(token)


def stream_texts(chunks: list[dict]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


async def tokenize(client, server: Server, **body) -> list[int]:
    reply = await post(client, server.url, body, path="/tokenize")
    assert reply.status == 200, reply.body
    return reply.body["tokens"]


# ------------------------------------------------------------------ /v1/completions


async def test_completion_of_a_string_prompt(server, client):
    body = await complete(client, server, prompt="Hello there", max_tokens=5, **GREEDY)
    assert body["object"] == "text_completion"
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length" and choice["text"]
    prompt_len = len(await tokenize(client, server, prompt="Hello there"))
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": 5, "total_tokens": prompt_len + 5,
                             "prompt_tokens_details": {"cached_tokens": 0}}


async def test_completion_default_max_tokens_is_16(server, client):
    body = await complete(client, server, prompt="Hello there", temperature=0, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 16


async def test_token_id_prompt_equals_its_text_prompt(server, client):
    ids = await tokenize(client, server, prompt="The quick brown fox")
    by_text = await complete(client, server, prompt="The quick brown fox", max_tokens=6, **GREEDY)
    by_ids = await complete(client, server, prompt=ids, max_tokens=6, **GREEDY)
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]


async def test_list_prompts_get_n_choices_each_numbered_prompt_major(server, client):
    ids = await tokenize(client, server, prompt="Paris is")
    body = await complete(client, server, prompt=[ids, [ids[0]]], n=2, max_tokens=3, **GREEDY)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in body["choices"]]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: the n choices of a prompt agree
    assert body["usage"]["prompt_tokens"] == len(ids) + 1
    assert body["usage"]["completion_tokens"] == 12


async def test_list_of_string_prompts(server, client):
    body = await complete(client, server, prompt=["Hello", "The capital"], max_tokens=2, **GREEDY)
    alone = await complete(client, server, prompt="The capital", max_tokens=2, **GREEDY)
    assert body["choices"][1]["text"] == alone["choices"][0]["text"]


async def test_streamed_completion_equals_non_stream(server, client):
    body = await complete(client, server, prompt=["Hello", "Numbers"], max_tokens=8, **GREEDY)
    chunks = await complete_stream(client, server, prompt=["Hello", "Numbers"], max_tokens=8, **GREEDY)
    assert stream_texts(chunks) == {c["index"]: c["text"] for c in body["choices"]}
    finishes = [c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]]
    assert finishes == ["length", "length"]


async def test_streamed_completion_usage_chunk(server, client):
    chunks = await complete_stream(client, server, prompt="Hello", max_tokens=4,
                                   stream_options={"include_usage": True}, **GREEDY)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_echo_puts_the_prompt_before_the_text(server, client):
    plain = await complete(client, server, prompt="Hello there", max_tokens=4, **GREEDY)
    echoed = await complete(client, server, prompt="Hello there", max_tokens=4, echo=True, **GREEDY)
    assert echoed["choices"][0]["text"] == "Hello there" + plain["choices"][0]["text"]
    chunks = await complete_stream(client, server, prompt="Hello there", max_tokens=4, echo=True, **GREEDY)
    assert stream_texts(chunks)[0] == echoed["choices"][0]["text"]


async def test_completion_logprobs(server, client):
    body = await complete(client, server, prompt="Hello there", max_tokens=5, logprobs=3, **GREEDY)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert_spells(lp["tokens"], body["choices"][0]["text"])
    assert all(len(top) == 3 for top in lp["top_logprobs"])
    # Greedy: the chosen token is the likeliest one.
    assert all(v == pytest.approx(max(top.values()), abs=1e-5) for v, top in zip(lp["token_logprobs"], lp["top_logprobs"]))
    assert lp["text_offset"] == [sum(map(len, lp["tokens"][:i])) for i in range(5)]


async def test_echo_with_logprobs_covers_the_prompt(server, client):
    prompt_len = len(await tokenize(client, server, prompt="Hello there"))
    body = await complete(client, server, prompt="Hello there", max_tokens=3, logprobs=1, echo=True, **GREEDY)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == prompt_len + 3
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v <= 0 for v in lp["token_logprobs"][1:])
    assert_spells(lp["tokens"], body["choices"][0]["text"])


async def test_streamed_logprobs_match_non_stream(server, client):
    body = await complete(client, server, prompt="Hello", max_tokens=6, logprobs=2, **GREEDY)
    chunks = await complete_stream(client, server, prompt="Hello", max_tokens=6, logprobs=2, **GREEDY)
    streamed = [v for ch in chunks for c in ch["choices"] if c["logprobs"] for v in c["logprobs"]["token_logprobs"]]
    offsets = [v for ch in chunks for c in ch["choices"] if c["logprobs"] for v in c["logprobs"]["text_offset"]]
    assert streamed == pytest.approx(body["choices"][0]["logprobs"]["token_logprobs"], abs=1e-5)
    assert offsets == body["choices"][0]["logprobs"]["text_offset"]


async def test_streamed_echoed_logprobs_of_n_choices_over_two_prompts_match_non_stream(server, client):
    request = {"prompt": ["Hello there", "Once upon a time"], "n": 2, "max_tokens": 3, "echo": True, "logprobs": 1,
               **GREEDY}
    body = await complete(client, server, **request)
    chunks = await complete_stream(client, server, **request)
    streamed: dict[int, list] = {}
    for chunk in chunks:
        for c in chunk["choices"]:
            if c["logprobs"]:
                streamed.setdefault(c["index"], []).extend(c["logprobs"]["token_logprobs"])
    for choice in body["choices"]:  # every choice echoes its prompt's logprobs, the first one null
        assert streamed[choice["index"]] == pytest.approx(choice["logprobs"]["token_logprobs"], abs=1e-5)
        assert choice["logprobs"]["token_logprobs"][0] is None and choice["logprobs"]["token_logprobs"][1] is not None


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "Hi", "suffix": "end"}, "suffix"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": [5, -1]}, "prompt"),
    ({"prompt": [[5], [10**9]]}, "prompt[1]"),
    ({"prompt": "Hi", "logit_bias": {"-3": 1}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"1000000": 1}}, "logit_bias"),
    ({"prompt": "Hi", "stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"prompt": "Hi", "response_format": {"type": "xml"}}, "response_format.type"),
    ({"prompt": "Hi", "best_of": 3}, "best_of"),
    ({"prompt": "Hi", "logprobs": 21}, "logprobs"),
    ({"prompt": 5}, "prompt"),
])
async def test_bad_completion_requests_are_400(server, client, body, param):
    reply = await post(client, server.url, body, path=COMPLETIONS)
    assert reply.status == 400, reply.body
    assert_valid("ErrorResponse", reply.body)
    assert reply.body["error"]["param"] == param


# ------------------------------------------------------------------ n


async def prompt_tokens_computed(client, server: Server) -> float:
    from test_operations import scrape, value

    return value(await scrape(client, server), "aserve:prompt_tokens_total")


@pytest.mark.parametrize("prefix_caching", [True, False])
async def test_chat_n_gives_n_choices_from_one_prefill(tiny_llama_dir, client, prefix_caching):
    async with serve(tiny_llama_dir, engine_settings={"enable_prefix_caching": prefix_caching}) as s:
        body = await chat(client, s, messages=HELLO, n=3, max_tokens=4, temperature=1.0, seed=1, ignore_eos=True)
        computed = await prompt_tokens_computed(client, s)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 12
    # The first choice computed the prompt; the two others copied all of it but the last token.
    assert computed == body["usage"]["prompt_tokens"] + 2
    assert len({c["message"]["content"] for c in body["choices"]}) > 1  # sampled with different seeds


async def test_completions_n_with_echoed_logprobs_share_one_prefill(tiny_llama_dir, client):
    # Prompt logprobs need every prompt position computed: once, by the first choice.
    async with serve(tiny_llama_dir) as s:
        body = await complete(client, s, prompt="Hello there, how are you", n=3, max_tokens=2, echo=True,
                              logprobs=1, **GREEDY)
        computed = await prompt_tokens_computed(client, s)
    prompt_len = body["usage"]["prompt_tokens"]
    assert computed == prompt_len + 2
    prompts = [c["logprobs"]["token_logprobs"][:prompt_len] for c in body["choices"]]
    assert prompts[0][0] is None and all(v is not None for v in prompts[0][1:])
    assert prompts[1] == prompts[0] and prompts[2] == prompts[0]


async def test_streamed_chat_n_has_every_index(server, client):
    s = await stream(client, server, messages=HELLO, n=2, max_tokens=3, **GREEDY)
    indices = {c["choices"][0]["index"] for c in s.chunks}
    finishes = [c["choices"][0]["finish_reason"] for c in s.chunks if c["choices"][0]["finish_reason"]]
    assert indices == {0, 1} and finishes == ["length", "length"]


# ------------------------------------------------------------------ sampling fields


async def greedy_ids(client, server: Server, **extra) -> list[int]:
    body = await complete(client, server, prompt="Hello there", max_tokens=12, logprobs=0, temperature=0, **extra)
    text = body["choices"][0]["text"]
    return await tokenize(client, server, prompt=text, add_special_tokens=False), body


async def test_logit_bias_forces_a_token(server, client):
    target = (await tokenize(client, server, prompt=" fox", add_special_tokens=False))[0]
    body = await complete(client, server, prompt="Hello", max_tokens=4, logit_bias={str(target): 100},
                          logprobs=0, **GREEDY)
    tokens = body["choices"][0]["logprobs"]["tokens"]
    assert tokens == [" fox"] * 4


async def test_penalties_change_a_repetitive_output(server, client):
    def repeats(body: dict) -> int:
        # Byte tokens of different characters all show as U+FFFD: only whole tokens count.
        tokens = [t for t in body["choices"][0]["logprobs"]["tokens"] if "\ufffd" not in t]
        return len(tokens) - len(set(tokens))

    _, plain = await greedy_ids(client, server, ignore_eos=True)
    assert repeats(plain) > 0, "the tiny model's greedy output should repeat itself"
    for field, value in (("frequency_penalty", 2.0), ("presence_penalty", 2.0), ("repetition_penalty", 10.0)):
        _, penalized = await greedy_ids(client, server, ignore_eos=True, **{field: value})
        assert repeats(penalized) < repeats(plain), field


async def forced_token(client, server: Server) -> int:
    return (await tokenize(client, server, prompt=" fox", add_special_tokens=False))[0]


async def test_stop_token_ids_end_the_output_with_stop(server, client):
    fox = await forced_token(client, server)
    body = await complete(client, server, prompt="Hello", max_tokens=6, logit_bias={str(fox): 100},
                          stop_token_ids=[fox], temperature=0)
    choice = body["choices"][0]
    assert (choice["finish_reason"], choice["text"]) == ("stop", "")  # the stop token itself is not shown
    assert body["usage"]["completion_tokens"] == 1


async def test_min_tokens_holds_back_a_stop_token(server, client):
    fox = await forced_token(client, server)
    body = await complete(client, server, prompt="Hello", max_tokens=8, logit_bias={str(fox): 100},
                          stop_token_ids=[fox], min_tokens=3, temperature=0, logprobs=0)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 4
    tokens = body["choices"][0]["logprobs"]["tokens"]
    assert len(tokens) == 4 and tokens[-1] == " fox" and " fox" not in tokens[:-1]  # its entry last, as counted
    assert not body["choices"][0]["text"].endswith(" fox")


async def test_user_and_max_completion_tokens(server, client):
    body = await chat(client, server, messages=HELLO, user="u-42", max_completion_tokens=3, **GREEDY)
    assert body["usage"]["completion_tokens"] == 3


async def test_completions_take_max_completion_tokens_too(server, client):
    body = await complete(client, server, prompt="Hello", max_completion_tokens=3, **GREEDY)
    assert body["usage"]["completion_tokens"] == 3  # not the endpoint's default of 16


@pytest.mark.parametrize(("ignore_eos", "finish", "tokens"), [(False, "stop", 1), (True, "length", 5)])
async def test_ignore_eos_generates_past_the_eos_token(server, client, ignore_eos, finish, tokens):
    eos = server.state.tokenizer.convert_tokens_to_ids("<|im_end|>")
    body = await complete(client, server, prompt="Hello", max_tokens=5, temperature=0, logit_bias={str(eos): 100},
                          ignore_eos=ignore_eos)
    assert (body["choices"][0]["finish_reason"], body["usage"]["completion_tokens"]) == (finish, tokens)


# ------------------------------------------------------------------ chat logprobs and messages


async def test_chat_logprobs_and_top_logprobs(server, client):
    body = await chat(client, server, messages=HELLO, max_tokens=5, logprobs=True, top_logprobs=4, **GREEDY)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    # A character cut off at the end is in the bytes but not in the text.
    assert b"".join(bytes(e["bytes"]) for e in content).decode("utf-8", "replace") in (text_of(body),
                                                                                      text_of(body) + "\ufffd")
    for entry in content:
        assert len(entry["top_logprobs"]) == 4
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]


async def test_chat_logprobs_false_has_none(server, client):
    body = await chat(client, server, messages=HELLO, max_tokens=2, **GREEDY)
    assert body["choices"][0]["logprobs"] is None


async def test_streamed_chat_logprobs(server, client):
    s = await stream(client, server, messages=HELLO, max_tokens=5, logprobs=True, top_logprobs=1, **GREEDY)
    entries = [e for c in s.chunks if c["choices"][0]["logprobs"] for e in c["choices"][0]["logprobs"]["content"]]
    assert len(entries) == 5
    assert b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8", "replace") in (s.text, s.text + "\ufffd")


async def test_content_parts_are_joined(server, client):
    parts = [{"type": "text", "text": "Hello there,"}, {"type": "text", "text": "how are you today?"}]
    as_parts = await tokenize(client, server, messages=[{"role": "user", "content": parts}])
    as_text = await tokenize(client, server, messages=[{"role": "user", "content": "Hello there,\nhow are you today?"}])
    assert as_parts == as_text


# A template that renders names and knows tools, compactly (the tiny tokenizer spends many
# tokens on the long tool prompt written for templates that do not).
TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{% if m['name'] %} ({{ m['name'] }}){% endif %}\n"
    "{% for c in m['tool_calls'] or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def templated_server(tiny_llama_dir, tmp_path_factory) -> AsyncIterator[Server]:
    """The tiny model with --chat-template and a generation_config.json of its own."""
    model = tmp_path_factory.mktemp("templated") / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3, "temperature": 0.0}))
    template = model.parent / "named.jinja"
    template.write_text(TEMPLATE)
    async with serve(model, {"chat_template": str(template), "max_model_len": 512}) as s:
        yield s


async def test_chat_template_file_replaces_the_models_and_renders_names(templated_server, client):
    with_name = await tokenize(client, templated_server, messages=[{"role": "user", "content": "Hi", "name": "ann"}])
    without = await tokenize(client, templated_server, messages=[{"role": "user", "content": "Hi"}])
    text = (await post(client, templated_server.url, {"tokens": with_name}, path="/detokenize")).body["prompt"]
    assert "(ann)" in text and len(with_name) > len(without)


async def test_generation_config_supplies_defaults(templated_server, client):
    body = await chat(client, templated_server, messages=HELLO, ignore_eos=True)
    assert body["usage"]["completion_tokens"] == 3  # max_new_tokens
    again = await chat(client, templated_server, messages=HELLO, ignore_eos=True)
    assert text_of(again) == text_of(body)  # temperature 0 from the file
    asked = await chat(client, templated_server, messages=HELLO, ignore_eos=True, max_tokens=5)
    assert asked["usage"]["completion_tokens"] == 5  # the request wins


async def test_generation_config_none_ignores_the_file(tiny_llama_dir, tmp_path, client):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    (model / "generation_config.json").write_text(json.dumps({"max_new_tokens": 3}))
    async with serve(model, {"generation_config": "none"}) as s:
        body = await chat(client, s, messages=HELLO, ignore_eos=True, temperature=0)
    assert body["usage"]["completion_tokens"] > 3


async def test_model_without_chat_template_serves_completions_only(tiny_llama_dir, tmp_path, client):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    async with serve(model) as s:
        reply = await post(client, s.url, {"messages": HELLO})
        assert reply.status == 400 and reply.body["error"]["code"] == "chat_template_missing"
        assert (await complete(client, s, prompt="Hello", max_tokens=2))["choices"][0]["finish_reason"]


# ------------------------------------------------------------------ /tokenize, /detokenize


async def test_tokenize_and_detokenize_round_trip(server, client):
    reply = await post(client, server.url, {"prompt": "Hello 你好", "return_token_strs": True}, path="/tokenize")
    assert reply.status == 200
    body = reply.body
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"])
    assert body["max_model_len"] == 256
    back = await post(client, server.url, {"tokens": body["tokens"]}, path="/detokenize")
    assert back.body == {"prompt": "Hello 你好"}


async def test_tokenize_messages_matches_the_chat_prompt(server, client):
    tokens = await tokenize(client, server, messages=HELLO)
    body = await chat(client, server, messages=HELLO, max_tokens=1)
    assert len(tokens) == body["usage"]["prompt_tokens"]


@pytest.mark.parametrize("add_special_tokens", [False, True])
async def test_tokenize_messages_adds_special_tokens_only_when_asked(server, client, monkeypatch, add_special_tokens):
    from tokenizers.processors import TemplateProcessing

    tokenizer = server.state.tokenizer
    plain = await tokenize(client, server, messages=HELLO)
    marker = tokenizer.convert_tokens_to_ids("<|im_start|>")  # a tokenizer that prepends a BOS-like token
    monkeypatch.setattr(tokenizer._tokenizer, "post_processor",
                        TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", marker)]))
    tokens = await tokenize(client, server, messages=HELLO, add_special_tokens=add_special_tokens)
    assert tokens == ([marker] + plain if add_special_tokens else plain)


async def test_detokenize_out_of_range_is_400(server, client):
    reply = await post(client, server.url, {"tokens": [10**9]}, path="/detokenize")
    assert reply.status == 400 and reply.body["error"]["param"] == "tokens"


# ------------------------------------------------------------------ response_format


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_json_schema_response_format_gives_valid_json(server, client, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    body = await chat(client, server, messages=HELLO, response_format=fmt, max_tokens=200, seed=seed, temperature=1.0)
    assert body["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(text_of(body)), PERSON)


async def test_json_object_response_format_gives_an_object(server, client):
    # A random model wanders; a bias towards "}" ends the object as soon as the grammar allows.
    close = (await tokenize(client, server, prompt="}", add_special_tokens=False))[0]
    fmt = {"type": "json_object"}
    s = await stream(client, server, messages=HELLO, response_format=fmt, max_tokens=50, logit_bias={str(close): 10},
                     temperature=0)
    assert s.finish_reason == "stop" and json.loads(s.text) == {}
    unguided = await chat(client, server, messages=HELLO, max_tokens=3, logit_bias={str(close): 10}, **GREEDY)
    assert text_of(unguided) == "}}}"


async def test_completions_json_schema_response_format(server, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    body = await complete(client, server, prompt="A person:", response_format=fmt, max_tokens=200, seed=5)
    jsonschema.validate(json.loads(body["choices"][0]["text"]), PERSON)


async def test_invalid_schema_is_400(server, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    reply = await post(client, server.url, {"messages": HELLO, "response_format": fmt})
    assert reply.status == 400 and reply.body["error"]["param"] == "response_format"


# ------------------------------------------------------------------ tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}


async def test_named_tool_choice_forces_a_valid_call(templated_server, client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = await chat(client, templated_server, messages=HELLO, tools=[WEATHER, CLOCK], tool_choice=choice,
                      max_tokens=200, seed=1)
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["choices"][0]["message"]["content"] is None


async def test_required_tool_choice_streams_calls(templated_server, client):
    # The array may go on; a bias towards "]" ends it once it holds one call.
    close = (await tokenize(client, templated_server, prompt="]", add_special_tokens=False))[0]
    s = await stream(client, templated_server, messages=HELLO, tools=[WEATHER, CLOCK], tool_choice="required",
                     max_tokens=200, seed=2, logit_bias={str(close): 10})
    fragments = [t for c in s.chunks for t in c["choices"][0]["delta"].get("tool_calls") or []]
    assert fragments and s.finish_reason == "tool_calls", s.text
    names = [f["function"]["name"] for f in fragments if "name" in f.get("function", {})]
    assert set(names) <= {"get_weather", "get_time"} and names


async def test_a_named_tool_choice_cut_by_max_tokens_still_returns_the_call(templated_server, client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    body = await chat(client, templated_server, messages=HELLO, tools=[WEATHER, CLOCK], tool_choice=choice,
                      max_tokens=3, seed=1)
    choice_body = body["choices"][0]
    assert choice_body["finish_reason"] == "length"
    (call,) = choice_body["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather" and call["function"]["arguments"].startswith("{")
    assert choice_body["message"]["content"] is None


def _required(text: str) -> list[tuple[str, dict]]:
    req = protocol.parse_chat_request({"messages": HELLO, "tools": [WEATHER, CLOCK], "tool_choice": "required"})
    return [(c.name, json.loads(c.arguments)) for c in forced_calls(req, text)]


@pytest.mark.parametrize(("text", "calls"), [
    ('[{"name": "get_weather", "parameters": {"city": "Paris"}}]', [("get_weather", {"city": "Paris"})]),
    ('[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": {"city": "Par',
     [("get_time", {}), ("get_weather", {"city": "Par"})]),
    ('[{"name": "get_weather", "param', [("get_weather", {})]),
    ('[{"name": "get_wea', []),  # the name is cut: no function's
    ("[", []),
    ("", []),
])
def test_required_tool_calls_are_read_as_far_as_the_output_got(text, calls):
    assert _required(text) == calls


async def test_required_without_parallel_calls_makes_exactly_one_call(templated_server, client):
    # No bias towards "]": the array would go on, but the grammar closes it after one call.
    body = await chat(client, templated_server, messages=HELLO, tools=[WEATHER, CLOCK], tool_choice="required",
                      parallel_tool_calls=False, max_tokens=200, seed=2)
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert len(body["choices"][0]["message"]["tool_calls"]) == 1
    req = protocol.parse_chat_request({"messages": HELLO, "tools": [WEATHER], "tool_choice": "required",
                                       "parallel_tool_calls": False})
    assert forced_tool_schema(req)["maxItems"] == 1


async def test_a_strict_forced_function_refuses_a_keyword_the_grammar_cannot_enforce(templated_server, client):
    unique = {"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}}}}
    choice = {"type": "function", "function": {"name": "pick"}}
    lenient = await post(client, templated_server.url, {"messages": HELLO, "tools": [unique], "tool_choice": choice,
                                                        "max_tokens": 5})
    assert lenient.status == 200
    strict = {"type": "function", "function": {**unique["function"], "strict": True}}
    refused = await post(client, templated_server.url, {"messages": HELLO, "tools": [strict], "tool_choice": choice,
                                                        "max_tokens": 5})
    assert refused.status == 400 and "uniqueItems" in refused.body["error"]["message"]


def test_a_template_that_only_mentions_tools_does_not_get_them(tiny_llama_dir):
    from transformers import AutoTokenizer

    from aserve.server.chat_prompt import chat_inputs, template_renders_tools

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = "{# tools are not supported here #}{% for m in messages %}{{ m.content }}{% endfor %}"
    assert not template_renders_tools(tok)
    req = protocol.parse_chat_request({"messages": HELLO, "tools": [WEATHER]})
    messages, tools = chat_inputs(req, template_renders_tools(tok))
    assert tools is None and "get_weather" in messages[0]["content"]  # described by aserve's own prompt
    tok.chat_template = ("{% for t in tools or [] %}{{ t.function.name }}{% endfor %}"
                         "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert template_renders_tools(tok)


async def test_tool_choice_naming_an_unknown_function_is_400(templated_server, client):
    choice = {"type": "function", "function": {"name": "nope"}}
    reply = await post(client, templated_server.url, {"messages": HELLO, "tools": [WEATHER], "tool_choice": choice})
    assert reply.status == 400 and reply.body["error"]["param"] == "tool_choice"


async def test_tools_reach_the_prompt_unless_tool_choice_is_none(templated_server, client):
    plain = await tokenize(client, templated_server, messages=HELLO)
    reply = await chat(client, templated_server, messages=HELLO, tools=[WEATHER], max_tokens=1)
    none = await chat(client, templated_server, messages=HELLO, tools=[WEATHER], tool_choice="none", max_tokens=1)
    assert reply["usage"]["prompt_tokens"] > len(plain)
    assert none["usage"]["prompt_tokens"] == len(plain)


# OpenAI's multi-turn example: the assistant's call and the tool's answer, sent back.
TOOL_HISTORY = [
    {"role": "user", "content": "What's the weather like in Paris today?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_12345xyz", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_12345xyz", "content": "18C and sunny"},
]


async def test_tool_call_history_is_accepted_and_rendered(templated_server, client):
    body = await chat(client, templated_server, messages=TOOL_HISTORY, tools=[WEATHER], max_tokens=2)
    tokens = await tokenize(client, templated_server, messages=TOOL_HISTORY)
    text = (await post(client, templated_server.url, {"tokens": tokens}, path="/detokenize")).body["prompt"]
    assert '"city": "Paris"' in text and "18C and sunny" in text
    assert body["usage"]["prompt_tokens"] > len(tokens)  # plus the tool descriptions


async def test_template_without_tools_gets_them_in_the_system_message(server, client):
    tokens = await tokenize(client, server, messages=TOOL_HISTORY, tools=[WEATHER])
    text = (await post(client, server.url, {"tokens": tokens}, path="/detokenize")).body["prompt"]
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18C and sunny\n</tool_response>" in text


class ScriptedRunner:
    """Stands in for the model runner: every sequence generates the tokens of SCRIPT, then EOS."""

    def __init__(self, runner, script: list[int], eos: int) -> None:
        self._runner, self._script, self._eos = runner, script, eos
        self.device = runner.device

    def run(self, scheduled) -> StepOutput:
        out = self._runner.run(scheduled)  # keeps the KV bookkeeping real
        tokens = [None if t is None else
                  (self._script + [self._eos])[min(len(item.seq.output_ids), len(self._script))]
                  for item, t in zip(scheduled, out.tokens)]
        return StepOutput(tokens, out.logprobs, out.prompt_logprobs)


@contextmanager
def scripted_output(server: Server, text: str) -> Iterator[Server]:
    """The server's engine, made to answer every request with `text` (restored after)."""
    state = server.state
    original = state.engine.runner
    script = state.tokenizer.encode(text, add_special_tokens=False)
    state.engine.runner = ScriptedRunner(original, script, state.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    try:
        yield server
    finally:
        state.engine.runner = original


CALL_TEXT = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest_asyncio.fixture(loop_scope="module")
async def scripted(templated_server):
    """The server's engine, made to answer with a tool call."""
    with scripted_output(templated_server, CALL_TEXT) as server:
        yield server


async def test_auto_tool_call_is_parsed_from_the_text(scripted, client):
    body = await chat(client, scripted, messages=HELLO, tools=[WEATHER], max_tokens=100)
    message = body["choices"][0]["message"]
    assert message["content"] == "Let me check."
    (call,) = message["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert body["choices"][0]["finish_reason"] == "tool_calls"


async def test_streamed_tool_call_fragments_assemble_into_the_call(scripted, client):
    s = await stream(client, scripted, messages=HELLO, tools=[WEATHER], max_tokens=100)
    fragments = [t for c in s.chunks for t in c["choices"][0]["delta"].get("tool_calls") or []]
    name = "".join(f["function"].get("name", "") for f in fragments)
    arguments = "".join(f["function"].get("arguments", "") for f in fragments)
    assert (name, json.loads(arguments)) == ("get_weather", {"city": "Paris"})
    assert {f["index"] for f in fragments} == {0}
    assert s.text == "Let me check." and s.finish_reason == "tool_calls"


async def test_without_tools_the_same_text_stays_content(scripted, client):
    body = await chat(client, scripted, messages=HELLO, max_tokens=100)
    assert "<tool_call>" in text_of(body) and "tool_calls" not in body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_with_tool_choice_none_call_text_stays_content(scripted, client):
    body = await chat(client, scripted, messages=HELLO, tools=[WEATHER], tool_choice="none", max_tokens=100)
    assert text_of(body) == CALL_TEXT and "tool_calls" not in body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "stop"


BROKEN_CALL = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n</tool_call>'


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_call_that_is_not_valid_json_stays_text(templated_server, client, streamed):
    with scripted_output(templated_server, BROKEN_CALL) as server:
        if streamed:
            s = await stream(client, server, messages=HELLO, tools=[WEATHER], max_tokens=100)
            text, finish = s.text, s.finish_reason
            assert not any("tool_calls" in c["choices"][0]["delta"] for c in s.chunks)
        else:
            body = await chat(client, server, messages=HELLO, tools=[WEATHER], max_tokens=100)
            text, finish = text_of(body), body["choices"][0]["finish_reason"]
            assert "tool_calls" not in body["choices"][0]["message"]
    assert (text, finish) == (BROKEN_CALL, "stop")


async def test_openai_sdk_multi_turn_tool_history_as_the_sdk_sends_it(scripted):
    """OpenAI's multi-turn example, verbatim: the SDK's own returned message object goes back
    into `messages` (with its null refusal, annotations, audio and function_call fields),
    followed by a tool message answering its call id."""
    import openai

    sdk = openai.AsyncOpenAI(base_url=scripted.url + "/v1", api_key="unused", max_retries=0)
    messages: list[Any] = [{"role": "user", "content": "What's the weather like in Paris today?"}]
    completion = await sdk.chat.completions.create(model=scripted.model, messages=messages, tools=[WEATHER],
                                                   max_tokens=100)
    assert completion.choices[0].message.tool_calls, completion
    tool_call = completion.choices[0].message.tool_calls[0]
    messages.append(completion.choices[0].message)
    messages.append({"role": "tool", "tool_call_id": tool_call.id, "content": "18C and sunny"})
    second = await sdk.chat.completions.create(model=scripted.model, messages=messages, tools=[WEATHER],
                                               max_tokens=100)
    await sdk.close()
    assert tool_call.function.name == "get_weather" and json.loads(tool_call.function.arguments) == {"city": "Paris"}
    assert second.usage.prompt_tokens > completion.usage.prompt_tokens  # the history was read, not refused
    assert_valid("CreateChatCompletionResponse", second.model_dump(mode="json", exclude_unset=True))


@pytest.mark.parametrize(("extra", "param"), [
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"n": 0}, "n"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]}, "messages[0].tool_call_id"),
])
async def test_bad_chat_fields_are_400(server, client, extra, param):
    reply = await post(client, server.url, {"messages": HELLO, **extra})
    assert reply.status == 400, reply.body
    assert_valid("ErrorResponse", reply.body)
    assert reply.body["error"]["param"] == param


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "Hi", "logit_bias": {"²": 1}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"9" * 4301: 1}}, "logit_bias"),
    ({"prompt": "Hi", "seed": 2**64}, "seed"),
    ({"prompt": "Hi", "response_format": {"type": "json_schema", "json_schema": {
        "name": "deep", "schema": json.loads('{"type": "object", "x": ' * 900 + "1" + "}" * 900)}}},
     "response_format"),
])
async def test_hostile_values_are_400_not_500(server, client, body, param):
    reply = await post(client, server.url, body, path=COMPLETIONS)
    assert reply.status == 400, reply.body
    assert reply.body["error"]["param"] == param


async def test_largest_seed_with_n_leaves_the_engine_running(server, client):
    body = await chat(client, server, messages=HELLO, n=2, seed=2**63 - 1, max_tokens=2)
    assert len(body["choices"]) == 2
    assert (await post(client, server.url, None, path="/health", method="GET")).status == 200


async def test_logprobs_have_an_entry_for_the_token_that_completed_a_stop_string(server, client):
    plain = await complete(client, server, prompt="Hello there", max_tokens=6, logprobs=0, **GREEDY)
    tokens = plain["choices"][0]["logprobs"]["tokens"]
    stop = next(t for t in tokens[1:] if t.strip() and "\ufffd" not in t)  # a later, visible token
    body = await complete(client, server, prompt="Hello there", max_tokens=6, logprobs=0, stop=[stop], **GREEDY)
    shown = body["choices"][0]["logprobs"]["tokens"]
    assert len(shown) == body["usage"]["completion_tokens"]  # one entry per counted token
    assert shown[-1] == stop  # counted, not shown in the text
    assert_spells(shown[:-1], body["choices"][0]["text"])


async def test_logprobs_have_an_entry_for_the_eos_token_as_it_is_counted(server, client):
    eos = server.state.tokenizer.convert_tokens_to_ids("<|im_end|>")
    # three tokens (EOS is masked before min_tokens), then EOS, which the bias makes certain
    body = await chat(client, server, messages=HELLO, max_tokens=10, min_tokens=3, logprobs=True, temperature=0,
                      logit_bias={str(eos): 100})
    assert body["choices"][0]["finish_reason"] == "stop"
    entries = body["choices"][0]["logprobs"]["content"]
    assert body["usage"]["completion_tokens"] == len(entries) == 4
    assert entries[-1]["token"] == "<|im_end|>"
    assert "<|im_end|>" not in body["choices"][0]["message"]["content"]
