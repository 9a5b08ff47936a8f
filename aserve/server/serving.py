"""What the handlers share: the engine, the tokenizer and the served model's identity."""

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import orjson
from aiohttp import web

from aserve.engine.engine_loop import EngineLoop
from aserve.engine.guided import GuidedDecoding
from aserve.models.lora import LoRAAdapter, LoRARegistry
from aserve.server.errors import APIError
from aserve.config import ServerConfig
from aserve.server.logprobs import TokenText
from aserve.server.metrics import Metrics
from aserve.server.reasoning import ReasoningParser
from aserve.server.chat_prompt import template_renders_tools
from aserve.server.tool_parsers import ToolParser, get_tool_parser

T = TypeVar("T")
request_log = logging.getLogger("aserve.requests")


@dataclass(eq=False)
class RequestRecord:
    """What one request's JSON log line says; filled in as its outputs arrive."""

    request_id: str
    model: str
    response_id: str | None = None  # the response's `id` (chatcmpl-..., cmpl-...), also in the engine's logs
    started: float = field(default_factory=time.monotonic)
    first_output: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    status: int = 200
    error: str | None = None  # the error code, also when a stream ended with an error event
    _choice_tokens: dict[int, int] = field(default_factory=dict)  # completion tokens per choice so far

    def add(self, index: int, out: Any, n: int) -> None:
        """One output (engine_loop.RequestOutput) of choice `index`; n choices per prompt."""
        if self.first_output is None:
            self.first_output = time.monotonic()
        self.completion_tokens += out.completion_tokens - self._choice_tokens.get(index, 0)
        self._choice_tokens[index] = out.completion_tokens
        if out.finish_reason:
            self.finish_reasons.append(out.finish_reason)
            if index % n == 0:
                self.prompt_tokens += out.prompt_tokens  # each prompt once, however many choices

    def to_json(self) -> str:
        now = time.monotonic()
        return orjson.dumps({
            "request_id": self.request_id, "id": self.response_id, "model": self.model, "status": self.status,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "ttft_s": None if self.first_output is None else round(self.first_output - self.started, 4),
            "total_s": round(now - self.started, 4), "finish_reasons": self.finish_reasons, "error": self.error,
        }).decode()


@dataclass(frozen=True)
class EmbeddingSpec:
    """What /v1/embeddings returns for the served model."""

    dimensions: int
    normalize: bool = True  # L2-normalized (a decoder's last-token pooling always is, as vLLM's default)
    matryoshka: bool = False  # `dimensions` may shorten it (the model was trained for that)


@dataclass
class StoredResponse:
    """A Responses API response kept for GET and previous_response_id (server/responses.py)."""

    response: dict
    history: list[dict]  # the conversation up to and including this response, as chat messages


@dataclass
class ResponseStore:
    """Stored responses, the oldest evicted past `capacity` (0: nothing is stored)."""

    capacity: int
    items: OrderedDict[str, StoredResponse] = field(default_factory=OrderedDict)

    def put(self, stored: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        self.items[stored.response["id"]] = stored
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        if (stored := self.items.get(response_id)) is None:
            raise APIError(f"no response with id {response_id!r} is stored here (never stored, deleted or evicted)",
                           status=404, param=param, code="response_not_found")
        return stored


# apply_chat_template's own arguments, which chat_template_kwargs may not override
_RESERVED_TEMPLATE_ARGS = frozenset({"conversation", "messages", "tools", "documents", "chat_template", "tokenize",
                                     "add_generation_prompt", "continue_final_message", "return_dict",
                                     "return_tensors", "padding", "truncation", "max_length", "tokenizer_kwargs"})


@dataclass(eq=False)
class ServingState:
    KEY: ClassVar[web.AppKey["ServingState"]]

    engine: EngineLoop
    tokenizer: Any  # a transformers tokenizer: chat template + encode
    model_name: str
    max_model_len: int
    guided: GuidedDecoding | None  # None for an embedding model, which generates nothing
    vocab_size: int  # the model's logits width: valid token ids are below it
    # Sampling defaults from the model's generation_config.json (temperature, top_p, top_k,
    # repetition_penalty, max_tokens), used where a request sets none, as vLLM does.
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    tool_parser: ToolParser = field(default_factory=lambda: get_tool_parser("hermes"))
    reasoning_parser: ReasoningParser | None = None  # None: thinking, if any, stays in the content
    settings: ServerConfig = field(default_factory=ServerConfig)
    metrics: Metrics | None = None  # made in __post_init__ when not given
    in_flight: int = 0  # sequences of requests between admission and their response's end
    draining: bool = False  # set on SIGTERM/SIGINT: running requests finish, new ones get 503
    # Templates and tokenization of long prompts take milliseconds: keep them off the event loop.
    tokenize_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="aserve-tokenize"))
    engine_task: asyncio.Task | None = None
    created: int = field(default_factory=lambda: int(time.time()))  # the model card's "created"
    lora: LoRARegistry | None = None  # the served LoRA adapters; None: LoRA is off
    responses: ResponseStore = field(default_factory=lambda: ResponseStore(1000))  # the Responses API's stored ones
    generates: bool = True  # False: an embedding (encoder) model, served on /v1/embeddings only
    embedding: EmbeddingSpec | None = None  # None: no embeddings (set for every model launch builds)
    token_text: TokenText = field(init=False)
    template_tools: bool = field(init=False)  # the chat template renders the tools it is given

    def __post_init__(self) -> None:
        self.token_text = TokenText(self.tokenizer)
        self.template_tools = template_renders_tools(self.tokenizer)
        if self.metrics is None:
            self.metrics = Metrics(self.model_name)
        self.engine.observer = self.metrics

    async def in_tokenize_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn, *args)

    async def compile_grammar(self, response_format: dict) -> Any:
        try:
            return await self.in_tokenize_thread(self.guided.compile, response_format)
        except ValueError as exc:
            raise APIError(f"response_format: {exc}", param="response_format") from None

    async def encode_prompt(self, text: str, add_special_tokens: bool = True, max_length: int | None = None) -> list[int]:
        """`max_length`: cut to that many tokens, special ones kept, on the tokenizer's truncation side."""
        return await self.in_tokenize_thread(lambda: self.tokenizer.encode(
            text, add_special_tokens=add_special_tokens, truncation=max_length is not None, max_length=max_length))

    async def decode(self, ids: list[int]) -> str:
        return await self.in_tokenize_thread(self.tokenizer.decode, ids)

    async def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict] | None = None,
                          add_generation_prompt: bool = True, add_special_tokens: bool = False,
                          template_kwargs: dict[str, Any] | None = None,
                          continue_final_message: bool = False) -> list[int]:
        if reserved := sorted(set(template_kwargs or ()) & _RESERVED_TEMPLATE_ARGS):
            raise APIError(f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
        return await self.in_tokenize_thread(self._encode_chat, messages, tools, add_generation_prompt,
                                              add_special_tokens, {**(template_kwargs or {}),
                                                                   "continue_final_message": continue_final_message})

    def _encode_chat(self, messages: list[dict[str, Any]], tools: list[dict] | None,
                     add_generation_prompt: bool, add_special_tokens: bool, template_kwargs: dict[str, Any]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError("this model has no chat template; the chat endpoint cannot format messages",
                           code="chat_template_missing")
        try:
            # template_kwargs (vLLM's chat_template_kwargs): variables the template reads, such
            # as Qwen3's enable_thinking.
            text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt, **template_kwargs)
        except Exception as exc:  # templates raise jinja errors for histories they reject
            raise APIError(f"the chat template rejected these messages: {exc}", param="messages") from None
        # The template already wrote any BOS it wants; encoding adds none unless asked (vLLM's
        # /tokenize add_special_tokens).
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def engine_alive(self) -> bool:
        return self.engine.healthy and self.engine_task is not None and not self.engine_task.done()

    def check_engine(self) -> None:
        if not self.engine_alive():
            raise APIError("the engine is not running", status=503, code="engine_unavailable")

    @contextmanager
    def admit(self, sequences: int, request_id: str, response_id: str | None = None) -> Iterator[RequestRecord]:
        """Holds `sequences` places for a request's lifetime, or refuses it with a 503 at once
        when more than max_waiting_requests would be waiting to run: queuing without
        bound only turns overload into timeouts. Counted here, when the handler commits to
        the request, because the engine sees a request only once its stream is first read.
        Yields the request's record, logged as one JSON line at the end (log_requests_json)."""
        if self.draining:
            raise APIError("the server is shutting down", status=503, code="shutting_down")
        limit = self.settings.max_waiting_requests
        # Every sequence past max_num_seqs waits for a place, whether or not the engine has seen it yet.
        if self.in_flight + sequences - self.engine.scheduler.max_num_seqs > limit:
            raise APIError(f"the server is busy: {limit} requests are already waiting; retry later",
                           status=503, code="server_busy", headers={"Retry-After": "1"})
        self.in_flight += sequences
        record = RequestRecord(request_id, self.model_name, response_id)
        try:
            yield record
        except APIError as exc:
            record.status, record.error = exc.status, exc.code
            raise
        except asyncio.CancelledError:
            record.status, record.error = 499, "client_gone"  # the client went away (nginx's code for it)
            raise
        except Exception:
            record.status = 500
            raise
        finally:
            self.in_flight -= sequences
            if self.settings.log_requests_json:
                request_log.info("%s", record.to_json())

    def check_prompt_chars(self, chars: int, param: str) -> None:
        # Checked before tokenizing: a huge prompt would hold the tokenize thread for seconds.
        if chars > self.settings.max_prompt_chars:
            raise APIError(f"the prompt is {chars} characters long; the limit is {self.settings.max_prompt_chars}",
                           param=param, code="prompt_too_long")

    @property
    def lora_adapters(self) -> dict[str, LoRAAdapter]:
        return self.lora.adapters if self.lora is not None else {}

    def served_name(self, adapter: LoRAAdapter | None) -> str:
        """The model a response names: the adapter the request ran on, else the base model."""
        return self.model_name if adapter is None else adapter.name

    def check_model(self, model: str | None, generate: bool = True) -> LoRAAdapter | None:
        """The LoRA adapter a request's `model` names, None for the base model (also when
        omitted, as vLLM does); a 404 for anything else; a 400 when `generate` is asked of an
        embedding model."""
        if generate and not self.generates:
            raise APIError(f"the model {self.model_name!r} is an embedding model: it does not generate text; "
                           "use /v1/embeddings", param="model", code="model_not_generative")
        if model is None or model == self.model_name:
            return None
        if (adapter := self.lora_adapters.get(model)) is not None:
            return adapter
        served = ", ".join(repr(m) for m in [self.model_name, *self.lora_adapters])
        raise APIError(f"the model {model!r} does not exist; this server serves {served}",
                       status=404, param="model", code="model_not_found")

    async def loaded_adapter(self, adapter: LoRAAdapter | None) -> LoRAAdapter | None:
        """`adapter` with its weights in memory: an adapter evicted (max_cpu_loras) is read
        back from its path on the tokenize thread."""
        if adapter is None or self.lora is None:
            return adapter
        if adapter.weights:
            self.lora.use(adapter)
            return adapter
        try:
            loaded = await self.in_tokenize_thread(self.lora.reload, adapter)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # its files changed or went away
            raise APIError(f"the LoRA adapter {adapter.name!r} could not be read back from {adapter.path}: "
                           f"{type(exc).__name__}: {exc}", status=500, code="lora_load_failed") from None
        self.lora.reloaded(adapter, loaded)
        return loaded

    @staticmethod
    def cache_salt(salt: str | None, adapter: LoRAAdapter | None) -> str:
        """The prefix-cache salt of a request: its own, plus its adapter's name, path and load,
        so that no two adapters (nor one name reloaded, from any path) share keys/values."""
        if adapter is None:
            return salt or ""
        return f"{salt or ''}\x00lora:{adapter.name}:{adapter.path}:{adapter.serial}"


ServingState.KEY = web.AppKey("serving_state", ServingState)
