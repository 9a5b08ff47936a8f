"""/v1/embeddings: an embedding model's vectors are sentence-transformers' own, the chat model
embeds too (last token, normalized), and every field and refusal behaves as OpenAI's API says.
The embedding model is a tiny random-weight BERT built at test time as a sentence-transformers
directory; the openai SDK and OpenAI's spec check the wire format."""

import base64
from collections.abc import AsyncIterator

import numpy as np
import openai
import pytest
import pytest_asyncio
import torch
from sentence_transformers import SentenceTransformer

from openapi_schema import assert_valid
from test_api import HELLO, Server, post, serve
from tiny_models import build_tiny_sentence_transformer

pytestmark = pytest.mark.asyncio(loop_scope="module")

SENTENCES = ["Hello world", "The quick brown fox jumps over the lazy dog.", "def add(a, b): return a + b",
             "A much longer sentence, about printing presses and the books they made cheaper, and more.", "ok",
             "Numbers 1 2 3 and symbols !?", "the the the the the the", "Paris is the capital of France."]


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    return build_tiny_sentence_transformer(tmp_path_factory.mktemp("tiny_st"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def encoder(st_dir) -> AsyncIterator[Server]:
    async with serve(st_dir, {"max_model_len": ""}) as s:
        yield s


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chat_server(tiny_llama_dir) -> AsyncIterator[Server]:
    async with serve(tiny_llama_dir) as s:
        yield s


async def _embed(client, server: Server, **body) -> dict:
    reply = await post(client, server.url, {"model": server.model, **body}, path="/v1/embeddings")
    assert reply.status == 200, reply.body
    if body.get("encoding_format") != "base64":  # the spec types the embedding as an array only
        assert_valid("CreateEmbeddingResponse", reply.body)
    return reply.body


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


async def test_vectors_are_sentence_transformers_own(encoder, client, st_dir):
    body = await _embed(client, encoder, input=SENTENCES)
    ours = np.array([d["embedding"] for d in body["data"]])
    reference = SentenceTransformer(str(st_dir), device="cpu").encode(SENTENCES)
    assert _cosines(ours, reference).min() >= 0.9999
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # its Normalize module
    assert [d["index"] for d in body["data"]] == list(range(len(SENTENCES)))


async def test_the_sdk_reads_base64_as_the_same_floats(encoder):
    async with openai.AsyncOpenAI(base_url=f"{encoder.url}/v1", api_key="none", max_retries=0) as sdk:
        floats = await sdk.embeddings.create(model=encoder.model, input=SENTENCES[:3], encoding_format="float")
        packed = await sdk.embeddings.create(model=encoder.model, input=SENTENCES[:3], encoding_format="base64")
        by_default = await sdk.embeddings.create(model=encoder.model, input=SENTENCES[:3])  # the SDK asks base64
    for a, b, c in zip(floats.data, packed.data, by_default.data):
        assert np.allclose(a.embedding, np.frombuffer(base64.b64decode(b.embedding), dtype="<f4"), atol=1e-6)
        assert np.allclose(a.embedding, c.embedding, atol=1e-6)


async def test_base64_is_little_endian_float32(encoder, client):
    floats = await _embed(client, encoder, input="Hello world")
    packed = await _embed(client, encoder, input="Hello world", encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, floats["data"][0]["embedding"], atol=1e-7)


async def test_token_id_inputs_embed_as_their_text_does(encoder, client):
    ids = encoder.state.tokenizer.encode("Hello world")
    by_text = await _embed(client, encoder, input="Hello world")
    by_ids = await _embed(client, encoder, input=ids)
    by_lists = await _embed(client, encoder, input=[ids, ids])
    assert by_ids["data"][0]["embedding"] == by_text["data"][0]["embedding"]
    assert len(by_lists["data"]) == 2 and by_lists["usage"]["prompt_tokens"] == 2 * len(ids)
    assert by_text["usage"] == {"prompt_tokens": len(ids), "total_tokens": len(ids)}


async def test_concurrent_requests_are_batched_and_answer_each_its_own(encoder, client):
    import asyncio

    steps = encoder.state.engine.steps
    bodies = await asyncio.gather(*(_embed(client, encoder, input=s) for s in SENTENCES))
    alone = await _embed(client, encoder, input=SENTENCES)
    assert np.allclose([b["data"][0]["embedding"] for b in bodies], [d["embedding"] for d in alone["data"]],
                       atol=1e-5)
    assert encoder.state.engine.steps - steps < 2 * len(SENTENCES)  # some steps ran several requests


async def test_truncate_prompt_tokens_cuts_a_long_input(encoder, client):
    long = "word " * 200  # over the model's 64 tokens
    reply = await post(client, encoder.url, {"input": long}, path="/v1/embeddings")
    assert reply.status == 400 and reply.body["error"]["code"] == "context_length_exceeded"
    assert "64" in reply.body["error"]["message"]
    body = await _embed(client, encoder, input=long, truncate_prompt_tokens=10)
    assert body["usage"]["prompt_tokens"] == 10


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input[1]"),
    ({"input": [10**6]}, "input"),
    ({"input": "hi", "dimensions": 8}, "dimensions"),  # not Matryoshka-trained
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
    ({"input": ["x"] * 5000}, "input"),
])
async def test_a_bad_request_is_a_400_naming_the_field(encoder, client, body, param):
    reply = await post(client, encoder.url, body, path="/v1/embeddings")
    assert reply.status == 400 and reply.body["error"]["param"] == param, reply.body
    assert_valid("ErrorResponse", reply.body)


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": HELLO}),
    ("/v1/completions", {"prompt": "hi"}),
    ("/v1/responses", {"input": "hi"}),
])
async def test_an_embedding_model_does_not_generate(encoder, client, path, body):
    reply = await post(client, encoder.url, body, path=path)
    assert reply.status == 400 and reply.body["error"]["code"] == "model_not_generative"
    assert "/v1/embeddings" in reply.body["error"]["message"]


async def test_an_embedding_model_frees_every_block_after_its_requests(encoder, client):
    await _embed(client, encoder, input=SENTENCES)
    blocks = encoder.state.engine.scheduler.blocks
    assert blocks.num_free == blocks.num_blocks and not encoder.state.engine.scheduler.running


async def test_dimensions_shorten_a_matryoshka_models_vectors(tmp_path, client):
    import json

    st_dir = build_tiny_sentence_transformer(tmp_path / "mrl", seed=1)
    config = json.loads((st_dir / "config.json").read_text())
    (st_dir / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [8, 16, 32]}))
    async with serve(st_dir, {"max_model_len": ""}) as mrl:
        short = await _embed(client, mrl, input=SENTENCES[:3], dimensions=8)
        reply = await post(client, mrl.url, {"input": "hi", "dimensions": 33}, path="/v1/embeddings")
    full = SentenceTransformer(str(st_dir), device="cpu").encode(SENTENCES[:3])
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)  # the leading 8, normalized again
    assert np.allclose([d["embedding"] for d in short["data"]], expected, atol=1e-5)
    assert reply.status == 400 and "at most 32" in reply.body["error"]["message"]


async def test_a_directory_saved_by_sentence_transformers_today_is_served(st_dir, tmp_path, client):
    SentenceTransformer(str(st_dir), device="cpu").save(str(tmp_path / "saved"))  # its newer config format
    async with serve(tmp_path / "saved", {"max_model_len": ""}) as saved:
        body = await _embed(client, saved, input=SENTENCES)
    reference = SentenceTransformer(str(tmp_path / "saved"), device="cpu").encode(SENTENCES)
    assert _cosines(np.array([d["embedding"] for d in body["data"]]), reference).min() >= 0.9999


async def test_a_module_that_would_change_the_vectors_is_refused_at_start(st_dir, tmp_path):
    import json
    import shutil

    shutil.copytree(st_dir, tmp_path / "dense")
    modules = json.loads((tmp_path / "dense" / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "dense" / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Dense are not supported"):
        async with serve(tmp_path / "dense", {"max_model_len": ""}):
            pass


# ---------------------------------------------------------------------------- the chat model


async def test_the_chat_model_embeds_its_last_tokens_normalized_hidden_state(chat_server, client, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    body = await _embed(client, chat_server, input=SENTENCES[:3])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for text, data in zip(SENTENCES[:3], body["data"]):
        ids = chat_server.state.tokenizer.encode(text, return_tensors="pt")
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[-1][0, -1]  # after the final norm
        expected = torch.nn.functional.normalize(hidden, dim=-1)
        assert torch.allclose(torch.tensor(data["embedding"]), expected, atol=1e-4)


async def test_chat_model_embeddings_run_beside_generation(chat_server, client):
    import asyncio

    from test_api import chat

    generation = asyncio.create_task(chat(client, chat_server, messages=HELLO, max_tokens=30, temperature=0,
                                          ignore_eos=True))
    embedded = await _embed(client, chat_server, input=SENTENCES)
    assert (await generation)["usage"]["completion_tokens"] == 30
    assert len(embedded["data"]) == len(SENTENCES)
    again = await _embed(client, chat_server, input=SENTENCES[0])  # a cached prompt embeds the same
    assert np.allclose(again["data"][0]["embedding"], embedded["data"][0]["embedding"], atol=1e-5)
