"""Guided decoding (response_format) on the tiny BPE tokenizer, driven by random logits."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from aserve.engine import guided
from aserve.engine.guided import GuidedDecoding, Guide, apply_masks

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def vocab(tiny_llama_dir) -> int:
    # Wider than the tokenizer, as models pad their embedding: the extra ids must never be allowed.
    return json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"] + 12


@pytest.fixture(scope="module")
def eos_ids(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id, tokenizer.pad_token_id]


@pytest.fixture(scope="module")
def gd(tokenizer, vocab, eos_ids) -> GuidedDecoding:
    return GuidedDecoding(tokenizer, vocab, eos_ids)


def _generate(gd: GuidedDecoding, guide: Guide, vocab: int, eos_ids: list[int], seed: int,
              bias: torch.Tensor | None = None, steps: int = 200) -> list[int]:
    """Greedy decoding of random logits under the guide; returns the tokens before EOS."""
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(steps):
        logits = torch.randn(1, vocab, generator=gen)
        if bias is not None:
            logits += bias
        apply_masks(logits, [guide])
        token = int(logits.argmax())
        if token in eos_ids:
            break
        guide.accept(token)
        out.append(token)
    return out


def _allowed(gd: GuidedDecoding, guide: Guide, vocab: int) -> set[int]:
    logits = torch.zeros(1, vocab)
    apply_masks(logits, [guide])
    return set(torch.isfinite(logits[0]).nonzero().flatten().tolist())


@pytest.mark.parametrize("seed", range(5))
def test_json_schema_output_parses_and_validates(gd, tokenizer, vocab, eos_ids, seed):
    guide = gd.guide(gd.compile(PERSON_FORMAT))
    tokens = _generate(gd, guide, vocab, eos_ids, seed)
    assert guide.is_terminated and guide.error is None
    value = json.loads(tokenizer.decode(tokens))
    jsonschema.validate(value, PERSON)
    assert set(value) == {"name", "age"}


@pytest.mark.parametrize("seed", range(3))
def test_json_object_output_is_a_dict(gd, tokenizer, vocab, eos_ids, seed):
    # Favour tokens that close strings and containers, so random logits finish in few steps.
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    bias = torch.zeros(vocab)
    bias[[i for i, t in enumerate(texts) if any(c in t for c in '"}]')]] = 2.0
    guide = gd.guide(gd.compile({"type": "json_object"}))
    tokens = _generate(gd, guide, vocab, eos_ids, seed, bias=bias)
    assert guide.is_terminated
    assert isinstance(json.loads(tokenizer.decode(tokens)), dict)


def test_json_object_first_tokens_all_open_an_object(gd, tokenizer, vocab):
    allowed = _allowed(gd, gd.guide(gd.compile({"type": "json_object"})), vocab)
    assert allowed
    assert all(tokenizer.decode([t]).startswith("{") for t in allowed)


@pytest.mark.parametrize("schema, message", [
    ({"type": "foo"}, "Invalid type: foo"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength (5) is greater than maxLength (2)"),
    ({"$ref": "#/$defs/missing"}, "does not exist"),
    ({"type": "string", "pattern": "(["}, "regex parse error"),
])
def test_invalid_schema_raises_value_error(gd, schema, message):
    with pytest.raises(ValueError, match="invalid JSON schema") as info:
        gd.compile({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert message in str(info.value)


@pytest.mark.parametrize("response_format", [{"type": "xml"}, {"type": "text"}, {}])
def test_unknown_response_format_type_raises_value_error(gd, response_format):
    with pytest.raises(ValueError, match="response_format.type must be 'json_object' or 'json_schema'"):
        gd.compile(response_format)


def test_json_schema_without_a_schema_object_raises_value_error(gd):
    with pytest.raises(ValueError, match="json_schema.schema must be a JSON Schema object"):
        gd.compile({"type": "json_schema", "json_schema": {"name": "x", "schema": "[1, 2]"}})


def test_unsupported_keyword_is_an_error_only_when_strict(gd, tokenizer):
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(ValueError, match="uniqueItems"):
        gd.compile({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    lenient = gd.guide(gd.compile({"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                          "strict": False}}))
    # Without strict the keyword is ignored, the rest enforced: repeated items pass, a string does not.
    for t in tokenizer.encode("[1, 1]"):
        lenient.accept(t)
    assert lenient.is_terminated and lenient.error is None
    other = gd.guide(gd.compile({"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                        "strict": False}}))
    for t in tokenizer.encode('["a"]'):
        other.accept(t)
    assert other.error is not None


def test_apply_masks_leaves_rows_without_a_guide_unchanged(gd, vocab):
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    before = logits.clone()
    apply_masks(logits, [None, gd.guide(gd.compile(PERSON_FORMAT)), None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    kept = torch.isfinite(logits[1])
    assert 0 < int(kept.sum()) < vocab
    assert torch.equal(logits[1][kept], before[1][kept])


def test_apply_masks_never_allows_ids_past_the_tokenizer(gd, tokenizer, vocab):
    logits = torch.zeros(2, vocab)
    # One guide at the start, one inside a string, where almost every token is allowed.
    inside = gd.guide(gd.compile(PERSON_FORMAT))
    for t in tokenizer.encode('{"name": "'):
        inside.accept(t)
    apply_masks(logits, [gd.guide(gd.compile(PERSON_FORMAT)), inside])
    assert int(torch.isfinite(logits[1]).sum()) > 100
    assert torch.isinf(logits[:, len(tokenizer):]).all()


def test_terminated_guide_allows_only_eos(gd, tokenizer, vocab, eos_ids):
    guide = gd.guide(gd.compile(PERSON_FORMAT))
    for t in tokenizer.encode('{"name": "Bob", "age": 42}'):
        assert not guide.is_terminated
        guide.accept(t)
    assert guide.is_terminated and guide.error is None
    assert _allowed(gd, guide, vocab) == set(eos_ids)


def test_rejected_token_is_recorded_and_only_eos_is_allowed(gd, tokenizer, vocab, eos_ids):
    guide = gd.guide(gd.compile(PERSON_FORMAT))
    guide.accept(tokenizer.encode("x")[0])  # an object must open with "{"
    assert guide.error is not None and "doesn't satisfy the grammar" in guide.error
    assert guide.is_terminated
    assert _allowed(gd, guide, vocab) == set(eos_ids)
    guide.accept(tokenizer.encode("{")[0])  # later tokens are ignored, not raised on
    assert guide.is_terminated


def test_guides_of_one_grammar_are_independent(gd, tokenizer, vocab):
    grammar = gd.compile(PERSON_FORMAT)
    advanced, fresh = gd.guide(grammar), gd.guide(grammar)
    for t in tokenizer.encode('{"name": "Bob", "age": 42}'):
        advanced.accept(t)
    assert advanced.is_terminated and not fresh.is_terminated
    assert _allowed(gd, fresh, vocab) == _allowed(gd, gd.guide(grammar), vocab)


def test_compile_is_cached_by_schema_not_by_name_or_key_order(gd):
    first = gd.compile(PERSON_FORMAT)
    reordered = dict(reversed(list(PERSON.items())))
    renamed = {"type": "json_schema", "json_schema": {"strict": True, "schema": reordered, "name": "other"}}
    assert gd.compile(PERSON_FORMAT) is first
    assert gd.compile(renamed) is first
    assert gd.compile({"type": "json_object"}) is not first


def test_compile_cache_is_bounded_least_recently_used_first(gd, monkeypatch):
    monkeypatch.setattr(guided, "_CACHE_SIZE", 2)
    fmts = [{"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer", "maximum": m}}}
            for m in range(3)]
    a, b = gd.compile(fmts[0]), gd.compile(fmts[1])
    assert gd.compile(fmts[0]) is a  # a is now the most recently used
    gd.compile(fmts[2])  # evicts b
    assert gd.compile(fmts[0]) is a
    assert gd.compile(fmts[1]) is not b
