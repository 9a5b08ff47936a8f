"""POST /v1/embeddings: OpenAI's embeddings, through the same queue and step loop as chat.

Each input is a pooling request (SamplingParams.pooling): the engine computes its prompt like
any other, prefix cache and chunked prefill included, and returns the pooled final hidden
state instead of a token. A generative model pools the last position and the vector is
L2-normalized (vLLM's default for decoder models), so one server does chat and retrieval; an
embedding model (a sentence-transformers directory, models/encoder.py) pools and normalizes
as its modules.json says.
"""

import base64
import uuid
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from aiohttp import web
from pydantic import Field

from aserve.engine.sequence import SamplingParams
from aserve.server import generation, protocol
from aserve.server.chat import read_json
from aserve.server.errors import APIError, json_response
from aserve.server.middleware import request_id
from aserve.server.serving import ServingState

MAX_INPUTS = 2048  # per request, OpenAI's limit


class EmbeddingRequest(protocol._Lenient):
    model: str | None = None
    # a string, a list of strings, a list of token ids, or a list of lists of token ids
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int | None, Field(ge=1)] = None
    user: str | None = None  # accepted and ignored
    # vLLM's: cut each input to this many tokens (on the tokenizer's truncation side) instead of a 400
    truncate_prompt_tokens: Annotated[int | None, Field(ge=1)] = None


def _vector(embedding: torch.Tensor, dimensions: int | None, normalize: bool) -> torch.Tensor:
    embedding = embedding.float().cpu()  # pooled on the model's device
    if dimensions is not None:
        embedding = embedding[:dimensions]  # Matryoshka: the leading dimensions, normalized again
    return F.normalize(embedding, dim=-1) if normalize or dimensions is not None else embedding


def _encode(vector: torch.Tensor, encoding_format: str | None) -> list[float] | str:
    if encoding_format == "base64":  # little-endian float32, as OpenAI's SDK decodes it
        return base64.b64encode(vector.to(torch.float32).numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


async def _prompts(state: ServingState, req: EmbeddingRequest) -> list[list[int]]:
    raw: list[Any] = [req.input] if isinstance(req.input, str) or (req.input and isinstance(req.input[0], int)) \
        else list(req.input)
    limit = min(MAX_INPUTS, state.settings.max_waiting_requests + state.engine.scheduler.max_num_seqs)
    if not raw:
        raise APIError("input is empty: give a string, a list of strings, or token ids", param="input")
    if len(raw) > limit:
        raise APIError(f"{len(raw)} inputs in one request; this server takes at most {limit}", param="input")
    state.check_prompt_chars(sum(len(x) for x in raw if isinstance(x, str)), "input")
    cut = req.truncate_prompt_tokens
    prompts = []
    for i, item in enumerate(raw):
        where = "input" if len(raw) == 1 else f"input[{i}]"
        if isinstance(item, str):
            if not item:
                raise APIError(f"{where} is an empty string", param=where)
            ids = await state.encode_prompt(item, max_length=cut)
        else:
            if not item:
                raise APIError(f"{where} is an empty list of token ids", param=where)
            if bad := [t for t in item if not 0 <= t < state.vocab_size]:
                raise APIError(f"{where}: token id {bad[0]} is out of range; the vocabulary has {state.vocab_size} "
                               "tokens", param=where)
            ids = list(item)
            if cut is not None and len(ids) > cut:
                ids = ids[-cut:] if getattr(state.tokenizer, "truncation_side", "right") == "left" else ids[:cut]
        if len(ids) > state.max_model_len:
            raise APIError(f"{where} is {len(ids)} tokens long; this model embeds at most {state.max_model_len} "
                           "(truncate_prompt_tokens cuts longer inputs)", param=where, code="context_length_exceeded")
        prompts.append(ids)
    return prompts


async def embeddings(request: web.Request) -> web.Response:
    state: ServingState = request.app[ServingState.KEY]
    req = protocol.parse_request(EmbeddingRequest, await read_json(request))
    lora = await state.loaded_adapter(state.check_model(req.model, generate=False))
    spec = state.embedding
    if spec is None:
        raise APIError("this server does not serve embeddings", param="model")
    if req.dimensions is not None and not spec.matryoshka:
        raise APIError(f"dimensions: this model's {spec.dimensions}-dimensional embeddings cannot be shortened (it "
                       "is not Matryoshka-trained, as its config would say)", param="dimensions")
    if req.dimensions is not None and req.dimensions > spec.dimensions:
        raise APIError(f"dimensions: at most {spec.dimensions}", param="dimensions")
    prompts = await _prompts(state, req)
    rid = f"embd-{uuid.uuid4().hex}"
    with state.admit(len(prompts), request_id(request), rid) as record:
        outputs = generation.start(state, rid, prompts, SamplingParams(max_tokens=1, pooling=True), 1, None, record,
                                   None, lora)
        choices = await generation.collect(outputs, len(prompts))
    data = [{"object": "embedding", "index": c.index,
             "embedding": _encode(_vector(c.embedding, req.dimensions, spec.normalize), req.encoding_format)}
            for c in choices]
    tokens = sum(c.prompt_tokens for c in choices)
    return json_response({"object": "list", "data": data, "model": state.served_name(lora),
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def add_embeddings_routes(app: web.Application) -> None:
    app.add_routes([web.post("/v1/embeddings", embeddings)])
