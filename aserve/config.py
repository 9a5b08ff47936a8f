"""Settings: dataclass defaults, overridden by config.toml, overridden by the command line."""

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    ssl_keyfile: str | None = None  # with ssl_certfile: serve HTTPS (vLLM's and uvicorn's flags)
    ssl_certfile: str | None = None
    # Bound to a loopback address, only requests whose Host is a loopback name or address, or one
    # of these (comma-separated), are served: a web page that rebinds its domain to 127.0.0.1
    # (DNS rebinding) gets 403 instead of the answers.
    allowed_hosts: str | None = None
    served_model_name: str | None = None  # default: the model directory's name
    max_body_bytes: int = 4 * 1024 * 1024
    shutdown_timeout: float = 5.0
    tool_parser: str = "auto"  # how tool calls are read out of the model's text (tool_parsers.py); auto: by template
    reasoning_parser: str | None = None  # qwen3 | deepseek_r1: <think> text as reasoning (reasoning.py); None: off
    api_key: str | None = None  # every API route requires "Authorization: Bearer KEY"; also $ASERVE_API_KEY
    metrics_require_api_key: bool = False  # false: /metrics is open to scrapers even with an api_key
    cors_allowed_origins: str | None = None  # comma-separated origins a browser may call from ("*": any); None: same-origin only
    max_waiting_requests: int = 1024  # queued requests beyond this get 503 with Retry-After at once
    max_messages: int = 2048  # messages per chat request
    max_prompt_chars: int = 1_000_000  # characters of prompt text (messages or prompt) per request
    request_timeout_seconds: float = 0.0  # a request still unfinished after this long is ended with an error; 0: never
    # A stream whose client takes no data for this long (its socket buffers full) is cut; 0: never.
    stream_write_timeout_seconds: float = 30.0
    sse_keepalive_seconds: float = 5.0  # a stream with nothing to send for this long gets a ": keep-alive" comment
    responses_store_size: int = 1000  # responses kept for previous_response_id and GET (oldest evicted); 0: none
    log_requests_json: bool = False  # one JSON line per finished request on the aserve.requests logger
    # POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's); also $ASERVE_ALLOW_RUNTIME_LORA_UPDATING=true
    allow_runtime_lora_updating: bool = False


@dataclass(frozen=True, slots=True)
class ModelConfig:
    path: str | None = None  # None: the default model (SmolLM2-135M-Instruct), fetched and converted once
    cache_dir: str | None = None  # None: $ASERVE_CACHE_DIR or ~/.cache/aserve
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda and on CPUs with AVX512-BF16 or AMX, else float32
    max_model_len: int | None = None  # prompt + completion tokens per request; None: the model's own context
    load_format: str = "auto"  # auto: the weight files; dummy: random weights of the config's shape (benchmarks)
    quantization: str = "auto"  # auto | none | int4 | fp16: weight-only quantized linears (models/quantize.py)
    # Dense copies of the quantized linears, for batches large enough that a dense matmul beats
    # the weight-only kernel (the row count is timed at start), kept if they fit in this much.
    dense_copy_memory: str = "1GiB"
    chat_template: str | None = None  # a Jinja file that replaces the model's chat template
    # LoRA adapters (vLLM's flags): PEFT directories served by name beside the base model.
    enable_lora: bool = False
    lora_modules: str | None = None  # "NAME=PATH,NAME=PATH"; each NAME is a model in /v1/models
    max_loras: int = 4  # different adapters in one step; sequences of others wait
    max_lora_rank: int = 16  # adapters of a higher rank are refused at start
    max_cpu_loras: int = 0  # adapters kept in memory, most recently used; others are read back when asked; 0: all
    # auto: sampling defaults from the model's generation_config.json (as vLLM); none: OpenAI's defaults
    generation_config: str = "auto"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    max_num_seqs: int = 64  # sequences running at once (README "KV cache" says why 64); more wait in the queue
    max_num_batched_tokens: int = 512  # tokens per step; bounds how long a prefill chunk can stall decodes
    # Work per step for a long prompt (> max_num_batched_tokens uncached tokens) while other
    # streams decode: smaller keeps their token gaps even, larger gets the long prompt its first
    # token sooner (README "Chunked prefill"); 0: no cap beyond max_num_batched_tokens.
    prefill_budget_while_decoding: int = 16
    # The KV cache: one pool of blocks of block_size positions, this much memory ("2GiB",
    # "512MiB" or bytes) allocated once at start; sequences take blocks as their tokens need them.
    kv_cache_memory: str = "2GiB"
    block_size: int = 16
    enable_prefix_caching: bool = True  # full blocks named by their tokens are shared by every prompt that starts so
    # Tokens a request may have waiting for its client: past it, a client that reads too slowly is
    # dropped with an error and its KV blocks freed (the engine never waits for a client); 0: no bound.
    max_buffered_tokens: int = 4096
    num_threads: int = 0  # torch CPU threads; 0: one per core
    seed: int | None = None  # seed for requests that set none; None: random


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


class ConfigError(Exception):
    pass


def load_config(path: Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Reads `path` (if given) and applies `overrides` ({section: {key: value}}, None values
    ignored) on top. Unknown sections or keys are errors: a typo must not be silently ignored."""
    data: dict[str, dict[str, Any]] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    config = Config()
    for source in (data, overrides or {}):
        for section, values in source.items():
            config = _apply(config, section, values, source is data)
    return config


def _apply(config: Config, section: str, values: Any, from_file: bool) -> Config:
    if section not in {f.name for f in fields(Config)} or not isinstance(values, dict):
        raise ConfigError(f"unknown config section [{section}]")
    current = getattr(config, section)
    known = {f.name for f in fields(current)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{section}]: {', '.join(sorted(unknown))}")
    # In TOML a missing key means "default"; "" stands for None where None is allowed.
    updates = {k: (None if from_file and v == "" else v) for k, v in values.items() if from_file or v is not None}
    return replace(config, **{section: replace(current, **updates)})
