"""Builds a ready-to-serve ServingState from a Config: model, tokenizer, KV cache, engine."""

import json
import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import tokenizers
import torch

from aserve.config import Config, ServerConfig
from aserve.engine.engine_loop import EngineLoop
from aserve.engine.guided import GuidedDecoding
from aserve.engine.block_manager import BlockManager
from aserve.engine.kv_cache import KVCache, parse_bytes
from aserve.engine.lora_slots import AdapterSlots
from aserve.engine.encoder_runner import EncoderRunner
from aserve.engine.model_runner import ModelRunner
from aserve.engine.scheduler import Scheduler
from aserve.models.encoder import Encoder, is_sentence_transformers, load_encoder
from aserve.models.loader import LoadedModel, load_model, resolve_dtype
from aserve.models.lora import LoRARegistry, wrap_model
from aserve.models.paged_attention import attention_backend
from aserve.models.quantize import QUANTIZATION_MODES
from aserve.models.store import default_cache_dir, resolve_model
from aserve.server.serving import EmbeddingSpec, ResponseStore, ServingState
from aserve.server.reasoning import get_reasoning_parser
from aserve.server.tool_parsers import get_tool_parser, parser_for_template

log = logging.getLogger("aserve")
# torch's own default (one thread per core), read before any model runner changes the count.
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _check_settings(config: Config) -> None:
    """Settings errors, raised before a model is downloaded, converted or loaded."""
    mc, ec = config.model, config.engine
    if mc.load_format not in ("auto", "dummy"):
        raise ValueError(f"unknown load_format {mc.load_format!r}; choose auto or dummy")
    if mc.quantization not in QUANTIZATION_MODES:
        raise ValueError(f"unknown quantization {mc.quantization!r}; choose {', '.join(QUANTIZATION_MODES)}")
    resolve_dtype(mc.dtype, torch.device(pick_device(mc.device)))
    parse_bytes(mc.dense_copy_memory)
    if ec.max_num_seqs < 1:
        raise ValueError("max_num_seqs must be at least 1")
    if ec.max_num_batched_tokens < ec.max_num_seqs:
        raise ValueError("max_num_batched_tokens must be at least max_num_seqs (every decode needs one token)")
    parse_bytes(ec.kv_cache_memory)  # raises for a malformed amount
    if ec.block_size < 1:
        raise ValueError("block_size must be at least 1")
    if mc.generation_config not in ("auto", "none"):
        raise ValueError(f"unknown generation_config {mc.generation_config!r}; choose auto or none")
    if mc.chat_template is not None and not Path(mc.chat_template).is_file():
        raise ValueError(f"chat template file not found: {mc.chat_template}")
    if config.server.tool_parser != "auto":
        get_tool_parser(config.server.tool_parser)  # raises for an unknown name
    get_reasoning_parser(config.server.reasoning_parser)
    lora_modules(config)  # raises for a malformed list
    if mc.max_loras < 1 or mc.max_lora_rank < 1:
        raise ValueError("max_loras and max_lora_rank must be at least 1")
    if mc.max_cpu_loras and mc.max_cpu_loras < mc.max_loras:
        # as vLLM: every adapter a step may run must be in memory at once
        raise ValueError(f"max_cpu_loras ({mc.max_cpu_loras}) must be 0 (all) or at least max_loras ({mc.max_loras})")
    if ec.prefill_budget_while_decoding < 0:
        raise ValueError("prefill_budget_while_decoding must be 0 (no cap) or positive")


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's CPU thread count for the calling thread (an OpenMP setting per thread), for a while."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def lora_modules(config: Config) -> dict[str, str]:
    """model.lora_modules as {name: path}; empty unless enable_lora."""
    mc = config.model
    if not mc.enable_lora:
        if mc.lora_modules:
            raise ValueError("lora_modules are given but enable_lora is false; add --enable-lora true")
        return {}
    modules: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (mc.lora_modules or "").split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"lora_modules: {item!r} is not NAME=PATH")
        if name in modules:
            raise ValueError(f"lora_modules: {name!r} is given twice")
        modules[name] = path
    return modules


def _load_adapters(config: Config, loaded: LoadedModel) -> tuple[LoRARegistry, AdapterSlots] | None:
    """Runs on the model thread: the adapters, checked against the model, and the model's
    LoRA slots; None when LoRA is off."""
    mc = config.model
    if not mc.enable_lora:
        return None
    registry = LoRARegistry(loaded.args, mc.max_lora_rank, mc.max_cpu_loras)
    for name, path in lora_modules(config).items():
        registry.add(registry.read(name, path))
    loaded.model.lora = wrap_model(loaded.model, loaded.args, mc.max_loras, mc.max_lora_rank, loaded.dtype)
    log.info("LoRA: %d adapter(s) (%s), %d slots of rank %d, %s in memory", len(registry.adapters),
             ", ".join(registry.adapters) or "none", mc.max_loras, mc.max_lora_rank,
             f"at most {mc.max_cpu_loras}" if mc.max_cpu_loras else "all")
    return registry, AdapterSlots(mc.max_loras)


def _load(config: Config, path: Path,
          threads: int) -> tuple[LoadedModel, KVCache, tuple[LoRARegistry, AdapterSlots] | None]:
    """Runs on the model thread."""
    mc, ec = config.model, config.engine
    torch.set_num_threads(threads)
    loaded = load_model(path, pick_device(mc.device), mc.dtype, mc.max_model_len,
                        random_weights=mc.load_format == "dummy", quantization=mc.quantization,
                        dense_copy_memory=parse_bytes(mc.dense_copy_memory))
    kv = KVCache.allocate(loaded.args, parse_bytes(ec.kv_cache_memory), ec.block_size, loaded.dtype, loaded.device)
    if kv.num_tokens < loaded.max_model_len:
        # One sequence of the longest allowed length must fit, or it could never run.
        raise ValueError(f"kv_cache_memory {ec.kv_cache_memory} holds {kv.num_tokens} tokens of this model, fewer "
                         f"than max_model_len {loaded.max_model_len}: raise --kv-cache-memory to at least "
                         f"{KVCache.bytes_per_block(loaded.args, ec.block_size, loaded.dtype) * -(-loaded.max_model_len // ec.block_size)} "
                         f"bytes or lower --max-model-len")
    return loaded, kv, _load_adapters(config, loaded)


def _tool_parser_name(name: str, tokenizer: Any) -> str:
    if name != "auto":
        return name
    chosen = parser_for_template(getattr(tokenizer, "chat_template", None))
    log.info("tool calls read as %s (--tool-parser auto, from the chat template)", chosen)
    return chosen


def build_state(config: Config) -> ServingState:
    # Never contact a model hub at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer

    mc, ec = config.model, config.engine
    _check_settings(config)
    threads = ec.num_threads if ec.num_threads > 0 else TORCH_DEFAULT_THREADS
    cache_dir = Path(mc.cache_dir) if mc.cache_dir else default_cache_dir()
    # Every torch op with more than one CPU thread runs on the model thread, loading included.
    # Each other thread that ran one would keep an OpenMP team of its own; with more OpenMP
    # threads than cores, libgomp stops spin-waiting between parallel regions, and a decode step
    # at batch 32 took 78 ms instead of 56 (bench/runner_ceiling.py's step, run on two threads).
    with _torch_threads(1):
        path = resolve_model(mc.path, cache_dir)  # may convert a GGUF file through torch, on this thread
    if is_sentence_transformers(path):
        return _build_encoder_state(config, path, threads)
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aserve-model")
    try:
        loaded, kv, lora = model_thread.submit(_load, config, path, threads).result()
    except BaseException:
        model_thread.shutdown(wait=False, cancel_futures=True)
        raise
    hf_tokenizer = AutoTokenizer.from_pretrained(path)
    if mc.chat_template is not None:
        hf_tokenizer.chat_template = Path(mc.chat_template).read_text()
    # The detokenizer runs on the event loop while the tokenize thread encodes: give it its own
    # copy of the Rust tokenizer rather than share one object across threads.
    detok_tokenizer = tokenizers.Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    eos = set(loaded.eos_token_ids)
    if hf_tokenizer.eos_token_id is not None:
        eos.add(hf_tokenizer.eos_token_id)
    log.info("model %s on %s, %s (%s); quantization %s: linear layers %s, %s; max_model_len %d",
             path, loaded.device, str(loaded.dtype).removeprefix("torch."), loaded.dtype_reason, mc.quantization,
             ", ".join(f"{n} {kind}" for kind, n in loaded.linears.items()), loaded.dense_copies,
             loaded.max_model_len)
    log.info("KV cache %d blocks x %d tokens = %d tokens in %.2f GiB (attention: %s)",
             kv.num_blocks, kv.block_size, kv.num_tokens, kv.nbytes / 2**30, attention_backend(loaded.device))
    blocks = BlockManager(kv.num_blocks, kv.block_size, ec.enable_prefix_caching)
    registry, loras = lora if lora is not None else (None, None)
    engine = EngineLoop(
        Scheduler(blocks, ec.max_num_seqs, ec.max_num_batched_tokens, loaded.max_model_len, eos,
                  loaded.args.attention_context_per_token, ec.prefill_budget_while_decoding, loras),
        ModelRunner(loaded.model, kv, blocks, loaded.device, seed=ec.seed, eos_token_ids=eos, loras=loras),
        detok_tokenizer,
        model_thread,
        max_buffered_tokens=ec.max_buffered_tokens,
        # The HTTP layer's own bound (serving.py), held by the engine too for anyone calling generate().
        max_sequences=ec.max_num_seqs + config.server.max_waiting_requests,
    )
    name = config.server.served_model_name or path.name
    defaults = generation_defaults(path) if mc.generation_config == "auto" else {}
    if defaults:
        log.info("sampling defaults from generation_config.json: %s", defaults)
    return ServingState(engine, hf_tokenizer, name, loaded.max_model_len,
                        GuidedDecoding(hf_tokenizer, loaded.args.vocab_size, eos), loaded.args.vocab_size, defaults,
                        tool_parser=get_tool_parser(_tool_parser_name(config.server.tool_parser, hf_tokenizer)),
                        reasoning_parser=get_reasoning_parser(config.server.reasoning_parser), settings=server_settings(config),
                        responses=ResponseStore(config.server.responses_store_size),
                        embedding=EmbeddingSpec(loaded.args.hidden_size),
                        lora=registry)


# An encoder step's inputs and tokens: a waiting input holds no memory (no KV cache), and
# larger steps sort more inputs by length before padding them in groups (models/encoder.py):
# 64 clients of 32 sentences served 111.7 embeddings/s with 1,024-token steps, 136.5 with 2,048
# and 148.3 with 4,096 (bench/embeddings.py, all-MiniLM-L6-v2, 2-core EPYC).
ENCODER_MAX_NUM_SEQS = 1024
ENCODER_STEP_TOKENS = 4096


def _build_encoder_state(config: Config, path: Path, threads: int) -> ServingState:
    """An embedding model (a sentence-transformers directory): the same engine loop and
    scheduler, with an encoder runner and no KV cache; /v1/embeddings only."""
    from transformers import AutoTokenizer

    mc, ec = config.model, config.engine
    if mc.enable_lora:
        raise ValueError(f"{path} is an embedding model; LoRA adapters are served on generative models only")
    device = torch.device(pick_device(mc.device))
    # auto keeps float32: the vectors then match sentence-transformers' own to cosine 1 - 1e-6
    dtype = torch.float32 if mc.dtype == "auto" else resolve_dtype(mc.dtype, device)[0]
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aserve-model")

    def load() -> Encoder:
        torch.set_num_threads(threads)
        return load_encoder(path, device, dtype)

    try:
        encoder = model_thread.submit(load).result()
    except BaseException:
        model_thread.shutdown(wait=False, cancel_futures=True)
        raise
    max_len = min(encoder.max_len, mc.max_model_len or encoder.max_len)
    # A waiting input holds no memory here (no KV cache), so many may be admitted: 64 clients
    # sending 32 sentences each are 2,048 inputs at once. Blocks are bookkeeping only.
    seqs = max(ec.max_num_seqs, ENCODER_MAX_NUM_SEQS)
    blocks = BlockManager(seqs * -(-max_len // ec.block_size), ec.block_size, False)
    budget = max(ec.max_num_batched_tokens, ENCODER_STEP_TOKENS, max_len)  # any one prompt fits a step whole
    hf_tokenizer = AutoTokenizer.from_pretrained(path)
    engine = EngineLoop(Scheduler(blocks, seqs, budget, max_len, (), whole_prompts=True),
                        EncoderRunner(encoder), tokenizers.Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str()),
                        model_thread, max_buffered_tokens=ec.max_buffered_tokens,
                        max_sequences=seqs + config.server.max_waiting_requests)
    log.info("embedding model %s on %s, %s: %s pooling%s, %d dimensions, inputs up to %d tokens", path, device,
             str(dtype).removeprefix("torch."), encoder.pooling, ", normalized" if encoder.normalize else "",
             encoder.dimensions, max_len)
    return ServingState(engine, hf_tokenizer, config.server.served_model_name or path.name, max_len, None,
                        hf_tokenizer.vocab_size, {}, settings=server_settings(config),
                        responses=ResponseStore(0), generates=False,
                        embedding=EmbeddingSpec(encoder.dimensions, encoder.normalize, encoder.matryoshka))


def server_settings(config: Config) -> ServerConfig:
    """The [server] settings, with the API key taken from $ASERVE_API_KEY when not configured
    (an environment variable keeps the secret out of config files and `ps` listings), and
    runtime LoRA updates allowed by $ASERVE_ALLOW_RUNTIME_LORA_UPDATING=true (vLLM's way)."""
    settings = config.server
    if not settings.api_key and os.environ.get("ASERVE_API_KEY"):
        settings = replace(settings, api_key=os.environ["ASERVE_API_KEY"])
    if os.environ.get("ASERVE_ALLOW_RUNTIME_LORA_UPDATING", "").lower() == "true":
        settings = replace(settings, allow_runtime_lora_updating=True)
    return settings


# generation_config.json key -> request field, the ones vLLM takes as defaults
_GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(model_dir: Path) -> dict:
    try:
        config = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return {field: config[key] for key, field in _GENERATION_KEYS.items() if config.get(key) is not None}
