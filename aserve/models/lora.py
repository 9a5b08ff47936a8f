"""LoRA adapters over the one base model: PEFT adapter directories, served side by side.

An adapter adds (B A x) * scaling to a linear layer's output. Our q/k/v and gate/up weights
are fused, so a fused layer's adapter is the parts' A matrices stacked ([parts * r, in]) and
their B matrices placed block-diagonally ([out, parts * r]): one pair of matmuls gives every
part its own delta. The scaling (lora_alpha / r, or / sqrt(r) with rsLoRA) is folded into B.

Each wrapped linear holds `max_loras` slots of such pairs, padded to the largest rank. A
forward gets, per slot in use, the rows of its tokens (`LoRAContext.groups`, set by the model
runner from the step's sequences) and adds that slot's delta to those rows only: rows of the
base model cost nothing, so a server with LoRA enabled and base-model traffic runs as without.
Grouping rows by adapter beats gathering each token's A and B: a 512-token prefill chunk would
gather 512 copies of B.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from aserve.models.llama import ModelArgs

# PEFT's module names -> (our fused module, the part's index in it)
TARGETS = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
           "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
           "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1),
           "down_proj": ("mlp.down_proj", 0)}


class LoRAError(ValueError):
    """An adapter that cannot be served; the message says why and names the path."""


def part_sizes(args: ModelArgs, module: str) -> tuple[list[int], int]:
    """(output sizes of the module's parts, input size)."""
    q, kv, h, i = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim, args.hidden_size, \
        args.intermediate_size
    return {"self_attn.qkv_proj": ([q, kv, kv], h), "self_attn.o_proj": ([h], q),
            "mlp.gate_up_proj": ([i, i], h), "mlp.down_proj": ([h], i)}[module]


@dataclass
class LoRAAdapter:
    name: str
    path: str
    rank: int
    # "layers.{i}.{module}" -> (A [parts * rank, in], B [out, parts * rank], scaling folded in)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def load_adapter(name: str, path: str | Path, args: ModelArgs, max_rank: int) -> LoRAAdapter:
    """Reads a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors or .bin)
    and checks it against the base model; LoRAError says what does not fit."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise LoRAError(f"{path}: no adapter_config.json; give a PEFT LoRA adapter directory")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; only LORA adapters are")
    if config.get("use_dora"):
        raise LoRAError(f"{path}: DoRA adapters are not supported")
    rank = int(config["r"])
    if rank > max_rank:
        raise LoRAError(f"{path}: rank {rank} exceeds max_lora_rank {max_rank}; raise --max-lora-rank to {rank}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise LoRAError(f"{path}: per-module rank_pattern / alpha_pattern is not supported")
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    tensors = _read_weights(path)
    adapter = LoRAAdapter(name, str(path), rank)
    parts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key, a in tensors.items():
        if not key.endswith("lora_A.weight"):
            continue
        prefix = key.removesuffix(".lora_A.weight")
        target = prefix.rsplit(".", 1)[-1]
        if target not in TARGETS:
            raise LoRAError(f"{path}: target module {target!r} is not supported; adapters may target "
                            f"{', '.join(TARGETS)}")
        layer = int(prefix.split("layers.")[1].split(".")[0])
        if layer >= args.num_layers:
            raise LoRAError(f"{path}: layer {layer} does not exist; the base model has {args.num_layers}")
        module, index = TARGETS[target]
        b = tensors.get(prefix + ".lora_B.weight")
        sizes, fan_in = part_sizes(args, module)
        if b is None or a.shape != (rank, fan_in) or b.shape != (sizes[index], rank):
            raise LoRAError(f"{path}: {prefix} has shapes A {tuple(a.shape)}, B {None if b is None else tuple(b.shape)}; "
                            f"the base model needs A ({rank}, {fan_in}) and B ({sizes[index]}, {rank}): "
                            "an adapter for another model?")
        parts.setdefault(f"layers.{layer}.{module}", {})[index] = (a.float(), b.float() * scaling)
    if not parts:
        raise LoRAError(f"{path}: no LoRA weights found")
    for module_name, by_part in parts.items():
        sizes, fan_in = part_sizes(args, module_name.split(".", 2)[2])
        a_full = torch.zeros(len(sizes) * rank, fan_in)
        b_full = torch.zeros(sum(sizes), len(sizes) * rank)
        row = 0
        for i, size in enumerate(sizes):
            if i in by_part:  # a part the adapter leaves out keeps zeros: no delta there
                a_full[i * rank:(i + 1) * rank] = by_part[i][0]
                b_full[row:row + size, i * rank:(i + 1) * rank] = by_part[i][1]
            row += size
        adapter.weights[module_name] = (a_full, b_full)
    return adapter


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "adapter_model.safetensors").is_file():
        return load_file(path / "adapter_model.safetensors")
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise LoRAError(f"{path}: neither adapter_model.safetensors nor adapter_model.bin")


@dataclass
class LoRAContext:
    """What the current forward's LoRA layers read: for each slot in use, the rows of x that
    belong to it (set by the model runner before each forward; empty for base-only steps)."""

    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class LoRALinear(nn.Module):
    """A base linear plus `slots` adapter slots (A [slots, parts * R, in], B [slots, out, parts * R])."""

    def __init__(self, base: nn.Module, parts: int, in_features: int, out_features: int, slots: int,
                 max_rank: int, dtype: torch.dtype, context: LoRAContext) -> None:
        super().__init__()
        self.base, self.parts, self.max_rank, self.context = base, parts, max_rank, context
        self.register_buffer("lora_a", torch.zeros(slots, parts * max_rank, in_features, dtype=dtype))
        self.register_buffer("lora_b", torch.zeros(slots, out_features, parts * max_rank, dtype=dtype))

    def set_slot(self, slot: int, weights: tuple[torch.Tensor, torch.Tensor] | None, rank: int) -> None:
        """Puts an adapter's pair in `slot` (padded from `rank` to max_rank per part), or zeros."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if weights is None:
            return
        a, b = weights
        for p in range(self.parts):
            dst = slice(p * self.max_rank, p * self.max_rank + rank)
            self.lora_a[slot, dst] = a[p * rank:(p + 1) * rank].to(self.lora_a.dtype)
            self.lora_b[slot, :, dst] = b[:, p * rank:(p + 1) * rank].to(self.lora_b.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for slot, rows in self.context.groups:
            xs = x.index_select(0, rows)
            y.index_add_(0, rows, (xs @ self.lora_a[slot].t()) @ self.lora_b[slot].t())
        return y


MODULES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def wrap_model(model: nn.Module, args: ModelArgs, slots: int, max_rank: int, dtype: torch.dtype) -> LoRAContext:
    """Wraps every adaptable linear of `model` in a LoRALinear with `slots` empty slots."""
    context = LoRAContext()
    for i, layer in enumerate(model.layers):
        for module in MODULES:
            base = layer.get_submodule(module)
            sizes, fan_in = part_sizes(args, module)
            layer.set_submodule(module, LoRALinear(base, len(sizes), fan_in, sum(sizes), slots, max_rank, dtype,
                                                   context))
    return context


def load_into_slot(model: nn.Module, slot: int, adapter: LoRAAdapter | None) -> None:
    """Fills `slot` of every LoRALinear with `adapter` (None: empties it)."""
    for i, layer in enumerate(model.layers):
        for module in MODULES:
            weights = None if adapter is None else adapter.weights.get(f"layers.{i}.{module}")
            layer.get_submodule(module).set_slot(slot, weights, 0 if adapter is None else adapter.rank)
