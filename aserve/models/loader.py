"""Builds a LlamaModel from a Hugging Face directory (config.json + safetensors)."""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from aserve.models.llama import LlamaModel, ModelArgs, RMSNorm, rope_tables
from aserve.models import quantize
from aserve.models.gguf import GGUFWeights
from aserve.models.onednn_linear import pack_linears
from aserve.models.store import GGUF_NAME

log = logging.getLogger("aserve.loader")

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class UnsupportedModelError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: LlamaModel
    args: ModelArgs
    max_model_len: int
    eos_token_ids: frozenset[int]
    dtype: torch.dtype
    device: torch.device
    dtype_reason: str  # why this dtype, for the start-up log
    linears: dict[str, int]  # how many linear layers are int4, int8, dense
    dense_copies: str  # what quantize.add_dense_copies did, for the start-up log


def read_hf_config(path: Path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    archs = getattr(config, "architectures", None) or []
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: architecture {archs[0] if archs else '(none given in config.json)'} is not supported; "
            f"aserve serves {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return config


# RoPE variants whose tables are fixed per position, checked against transformers' logits past
# the original context (tests/test_model.py). Others (dynamic NTK, longrope) change the table
# with the sequence's length, which one table computed at start cannot do: refused, not served wrong.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _rope_inv_freq(config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type {rope_type!r} is not supported (its table depends on the sequence length); aserve serves "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        # transformers puts the file's rope_theta in rope_parameters; 10,000 is Llama's own default.
        base = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # The scaled variants' tables are transformers' own; the attention factor (yarn) scales cos/sin.
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq, float(scaling)


def _eos_ids(path: Path, config) -> frozenset[int]:
    ids: set[int] = set()
    for source in (config.eos_token_id, _generation_config(path).get("eos_token_id")):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(source)
    return frozenset(ids)


def _generation_config(path: Path) -> dict:
    file = path / "generation_config.json"
    return json.loads(file.read_text()) if file.exists() else {}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{path}: no *.safetensors weights found")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def _fused_state_dict(tensors: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Maps HF tensor names onto LlamaModel's, concatenating q/k/v and gate/up."""
    t = {name.removeprefix("model."): w for name, w in tensors.items()}
    state = {"embed_tokens.weight": t["embed_tokens.weight"], "norm.weight": t["norm.weight"]}
    state["lm_head.weight"] = t["embed_tokens.weight"] if args.tie_word_embeddings else tensors["lm_head.weight"]
    for i in range(args.num_layers):
        p = f"layers.{i}."
        attn = p + "self_attn."
        state[attn + "qkv_proj.weight"] = torch.cat([t[attn + f"{n}_proj.weight"] for n in "qkv"])
        if args.qkv_bias:
            state[attn + "qkv_proj.bias"] = torch.cat([t[attn + f"{n}_proj.bias"] for n in "qkv"])
        state[attn + "o_proj.weight"] = t[attn + "o_proj.weight"]
        if args.qk_norm:
            state[attn + "q_norm.weight"] = t[attn + "q_norm.weight"]
            state[attn + "k_norm.weight"] = t[attn + "k_norm.weight"]
        mlp = p + "mlp."
        state[mlp + "gate_up_proj.weight"] = torch.cat([t[mlp + "gate_proj.weight"], t[mlp + "up_proj.weight"]])
        state[mlp + "down_proj.weight"] = t[mlp + "down_proj.weight"]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{p}{norm}.weight"] = t[f"{p}{norm}.weight"]
    return state


def load_model(path: Path, device: str, dtype: str, max_model_len: int | None,
               random_weights: bool = False, quantization: str = "auto",
               dense_copy_memory: int = 1 << 30) -> LoadedModel:
    """`random_weights`: ignore any weight files and initialize randomly (the config alone
    gives the shape), to measure speed of model shapes whose weights are not at hand.
    `quantization`, `dense_copy_memory`: see quantize.py (plan, add_dense_copies)."""
    config = read_hf_config(path)
    tensors = None if random_weights else _read_tensors(path)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    args = ModelArgs(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        # With weights at hand they tell the layout; without, the architecture does.
        qkv_bias=("model.layers.0.self_attn.q_proj.bias" in tensors) if tensors is not None
        else config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
        qk_norm=("model.layers.0.self_attn.q_norm.weight" in tensors) if tensors is not None
        else config.model_type == "qwen3",
        tie_word_embeddings=("lm_head.weight" not in tensors) if tensors is not None
        else bool(getattr(config, "tie_word_embeddings", False)),
    )
    context = args.max_position_embeddings
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and window < context:
        # Attention here is full. Within the window that is exactly sliding-window attention;
        # beyond it, it would be another model. So the window is the context, and no more.
        if max_model_len and max_model_len > window:
            raise UnsupportedModelError(
                f"this model attends through a sliding window of {window} tokens, which aserve does not "
                f"implement: it serves up to {window} tokens of context (max_model_len {max_model_len} asked)")
        log.info("the model's sliding window of %d tokens is its context here (attention within it is exact)",
                 window)
        context = window
    max_len = min(max_model_len or context, context)
    if max_model_len and max_model_len > context:
        log.warning("max_model_len %d exceeds the model's context %d; using %d", max_model_len, context, context)

    torch_device = torch.device(device)
    torch_dtype, dtype_reason = resolve_dtype(dtype, torch_device)
    gguf = GGUFWeights(path / GGUF_NAME, args.num_heads, args.num_kv_heads) \
        if tensors is not None and (path / GGUF_NAME).is_file() else None
    # Build on the meta device so no memory is spent on a random init we would overwrite, and
    # so that a quantized linear never exists in float at all.
    with torch.device("meta"):
        model = LlamaModel(args)
    kinds = quantize.plan(model, quantization, torch_dtype, torch_device, gguf)
    quantize.swap_linears(model, kinds)
    model.to_empty(device=torch_device).to(torch_dtype)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.float()  # norm weights stay float32: the norms compute in float32
        elif isinstance(module, quantize.Int8Linear):
            module.scales = module.scales.float()  # GGUF's float16 scales lose bits in bfloat16
    if tensors is None:
        generator = torch.Generator().manual_seed(0)
        quantize.fill_quantized(kinds, None, None, generator, model)
        _init_random(model)
    else:
        dense = _fused_state_dict(tensors, args)
        del tensors
        quantize.fill_quantized(kinds, dense, gguf, None, model)
        missing, unexpected = model.load_state_dict(dense, strict=False)
        filled = {f"{name}.{key}" for name in kinds for key, _ in model.get_submodule(name).named_buffers()}
        if unexpected or set(missing) - filled:
            raise UnsupportedModelError(f"{path}: weights do not match the model: missing "
                                        f"{sorted(set(missing) - filled)[:5]}, unexpected {unexpected[:5]}")
        del dense  # the checkpoint's copy: free it before packing or quantizing makes more
    inv_freq, rope_scaling = _rope_inv_freq(config, head_dim)
    model.set_rope(*(t.to(torch_device) for t in rope_tables(inv_freq, rope_scaling, max_len)))
    model.eval()
    if quantization == "fp16":
        quantize.fp16_dynamic(model, torch_device)
    pack_linears(model)  # what is left in float32 on CPU
    dense_copies = quantize.add_dense_copies(model, dense_copy_memory, torch_dtype)
    return LoadedModel(model, args, max_len, _eos_ids(path, config), torch_dtype, torch_device,
                       dtype_reason, quantize.count(model), dense_copies)


@torch.no_grad()
def _init_random(model: LlamaModel, seed: int = 0) -> None:
    generator = torch.Generator(model.embed_tokens.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02, generator=generator)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); without it bfloat16
    matmuls are emulated and tens of times slower than float32."""
    probes = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(probe is not None and probe() for probe in probes)


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype to run in, and why (for the start-up log)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16, "auto: bfloat16 on a GPU"
        if cpu_has_bf16():
            return torch.bfloat16, "auto: this CPU has AVX512-BF16 or AMX"
        return torch.float32, "auto: this CPU lacks AVX512-BF16 and AMX, where bfloat16 is emulated"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose auto, {', '.join(dtypes)}")
    return dtypes[name], "as configured"
