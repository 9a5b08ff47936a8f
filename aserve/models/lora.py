"""LoRA adapters over the one base model: PEFT adapter directories, served side by side.

An adapter adds (B A x) * scaling to a linear layer's output. Our q/k/v and gate/up weights
are fused, so a fused layer's adapter is the parts' A matrices stacked ([parts * r, in]) and
their B matrices placed block-diagonally ([out, parts * r]): one pair of matmuls gives every
part its own delta. The scaling (lora_alpha / r, or / sqrt(r) with rsLoRA) is folded into B.

Each wrapped linear holds `max_loras` slots of such pairs, padded to the largest rank, side by
side: A as [slots * parts * R, in], B as [out, slots * parts * R]. A step with LoRA rows then
costs three ops per layer whatever its mix of adapters: x A^T for every slot at once, a mask
that keeps each row's own slot's columns (zero for base-model rows), and one matmul with B.
The other slots' columns are wasted work, small next to the base matmul (4 slots of rank 16
on q/k/v: 192 columns against 960). Grouping rows by adapter instead (index_select, two
matmuls and index_add_ per adapter) took 4 ops per adapter per layer: at 32 streams over 4
adapters, 200 tok/s against 447 for the base model alone. A step without LoRA rows skips it all.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from aserve.models.llama import ModelArgs
from aserve.models.onednn_linear import OneDNNLinear
from aserve.models.quantize import dense_linear

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


@dataclass(eq=False)
class LoRAAdapter:
    name: str
    path: str
    rank: int
    # Which load this is, set when served: a name loaded again at run time (from any path) is
    # another adapter, while the same load read back from disk after eviction is the same one.
    # The engine keys its slots by it.
    serial: int = 0
    # "layers.{i}.{module}" -> (A [parts * rank, in], B [out, parts * rank], scaling folded in);
    # empty in the registry's entry of an adapter evicted from memory (max_cpu_loras)
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


@dataclass
class LoRARegistry:
    """The adapters served by name, and what checking one more against the model needs.

    At most `max_cpu_loras` of them (0: all) keep their weights in memory, the most recently
    used; the others' entries keep only name, path and serial, and a request for one reads it
    back from disk (`reload`). Requests hold the loaded adapter itself, so an eviction never
    takes weights from a request that is queued or running."""

    args: ModelArgs
    max_rank: int
    max_cpu_loras: int = 0
    adapters: dict[str, LoRAAdapter] = field(default_factory=dict)
    loads: int = 0  # adapters loaded so far: each load's serial
    _recent: OrderedDict[str, None] = field(default_factory=OrderedDict)  # names in memory, least recent first

    def read(self, name: str, path: str | Path) -> LoRAAdapter:
        """Reads and checks an adapter (file I/O: off the event loop); `add` serves it."""
        return load_adapter(name, path, self.args, self.max_rank)

    def add(self, adapter: LoRAAdapter) -> None:
        self.loads += 1
        adapter.serial = self.loads
        self.adapters[adapter.name] = adapter
        self.use(adapter)

    def remove(self, name: str) -> LoRAAdapter | None:
        self._recent.pop(name, None)
        return self.adapters.pop(name, None)

    def in_memory(self) -> list[str]:
        return list(self._recent)

    def use(self, adapter: LoRAAdapter) -> None:
        """Marks a loaded adapter most recently used, evicting the least recently used past the cap."""
        self._recent[adapter.name] = None
        self._recent.move_to_end(adapter.name)
        while self.max_cpu_loras and len(self._recent) > self.max_cpu_loras:
            name, _ = self._recent.popitem(last=False)
            self.adapters[name] = replace(self.adapters[name], weights={})

    def reload(self, entry: LoRAAdapter) -> LoRAAdapter:
        """An evicted adapter read back from its path (file I/O: off the event loop), as the
        same load: same serial, so the same slots and cached blocks serve it. `use` serves it."""
        adapter = self.read(entry.name, entry.path)
        adapter.serial = entry.serial
        return adapter

    def reloaded(self, entry: LoRAAdapter, adapter: LoRAAdapter) -> None:
        """Puts a reloaded adapter back in the registry, unless its name was unloaded or loaded
        again meanwhile (then only the request that read it uses it)."""
        current = self.adapters.get(entry.name)
        if current is not None and current.serial == entry.serial:
            self.adapters[entry.name] = adapter
            self.use(adapter)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "adapter_model.safetensors").is_file():
        return load_file(path / "adapter_model.safetensors")
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise LoRAError(f"{path}: neither adapter_model.safetensors nor adapter_model.bin")


@dataclass
class LoRAContext:
    """What the current forward's LoRA layers read: each row's slot (-1: the base model), set
    by the model before each forward; None for a step without LoRA rows."""

    slots: int
    row_slots: torch.Tensor | None = None
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)

    def set_rows(self, row_slots: torch.Tensor | None) -> None:
        self.row_slots, self._masks = row_slots, {}

    def mask(self, width: int, dtype: torch.dtype) -> torch.Tensor:
        """[T, slots * width]: 1 in each row's own slot's `width` columns, else 0 (made once
        per forward and width, shared by the layers)."""
        if width not in self._masks:
            assert self.row_slots is not None
            column_slot = torch.arange(self.slots * width, device=self.row_slots.device) // width
            self._masks[width] = (column_slot.unsqueeze(0) == self.row_slots.unsqueeze(1)).to(dtype)
        return self._masks[width]


class LoRALinear(nn.Module):
    """A base linear plus `slots` adapter slots side by side (A [slots * parts * R, in],
    B [out, slots * parts * R])."""

    def __init__(self, base: nn.Module, parts: int, in_features: int, out_features: int, slots: int,
                 max_rank: int, dtype: torch.dtype, context: LoRAContext) -> None:
        super().__init__()
        self.base, self.parts, self.max_rank, self.context = base, parts, max_rank, context
        self.width = parts * max_rank  # one slot's columns
        self.register_buffer("lora_a", torch.zeros(slots * self.width, in_features, dtype=dtype))
        self.register_buffer("lora_b", torch.zeros(out_features, slots * self.width, dtype=dtype))
        self._pack()

    def _pack(self) -> None:
        # Prepacked for oneDNN, redone when a slot changes (quantize.dense_linear): these small
        # bfloat16 matmuls took half the time that way (32 rows: 93 against 190 us on q/k/v).
        object.__setattr__(self, "_a", dense_linear(self.lora_a))
        object.__setattr__(self, "_b", dense_linear(self.lora_b))

    def set_slot(self, slot: int, weights: tuple[torch.Tensor, torch.Tensor] | None, rank: int) -> None:
        """Puts an adapter's pair in `slot` (each part padded from `rank` to max_rank), or zeros."""
        columns = slice(slot * self.width, (slot + 1) * self.width)
        self.lora_a[columns] = 0
        self.lora_b[:, columns] = 0
        if weights is None:
            self._pack()
            return
        a, b = weights
        for p in range(self.parts):
            dst = slice(slot * self.width + p * self.max_rank, slot * self.width + p * self.max_rank + rank)
            self.lora_a[dst] = a[p * rank:(p + 1) * rank].to(self.lora_a.dtype)
            self.lora_b[:, dst] = b[:, p * rank:(p + 1) * rank].to(self.lora_b.dtype)
        self._pack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.context.row_slots is None:
            return y
        mask = self.context.mask(self.width, x.dtype)
        if isinstance(self._a, OneDNNLinear):
            # the mask and the add as oneDNN post-ops: two calls instead of four
            # (the model runner at batch 32 over 4 adapters: 67.4 against 75.1 ms a step)
            return self._b.binary(self._a.binary(x, mask, "mul"), y, "add")
        return y.add_(self._b(self._a(x) * mask))


MODULES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def wrap_model(model: nn.Module, args: ModelArgs, slots: int, max_rank: int, dtype: torch.dtype) -> LoRAContext:
    """Wraps every adaptable linear of `model` in a LoRALinear with `slots` empty slots."""
    context = LoRAContext(slots)
    for i, layer in enumerate(model.layers):
        for module in MODULES:
            base = layer.get_submodule(module)
            sizes, fan_in = part_sizes(args, module)
            layer.set_submodule(module, LoRALinear(base, len(sizes), fan_in, sum(sizes), slots, max_rank, dtype,
                                                   context))
    return context


def load_into_slot(model: nn.Module, slot: int, adapter: LoRAAdapter | None, layers: range | None = None) -> None:
    """Fills `slot` of every LoRALinear in `layers` (default all) with `adapter` (None: empties it)."""
    assert adapter is None or adapter.weights, f"LoRA adapter {adapter.name!r} has no weights in memory"
    for i in layers if layers is not None else range(len(model.layers)):
        layer = model.layers[i]
        for module in MODULES:
            weights = None if adapter is None else adapter.weights.get(f"layers.{i}.{module}")
            layer.get_submodule(module).set_slot(slot, weights, 0 if adapter is None else adapter.rank)
