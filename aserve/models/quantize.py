"""Weight-only quantized linear layers, and which one each of the model's linears becomes.

Decoding at small batch is bound by reading the weights, so the cheapest bytes are the ones
never widened: a GGUF's 4-bit matrices are served as 4-bit (`Int4Linear`, torch's int4
weight-only CPU kernel, 32 weights per scale and zero), its 8-bit ones as int8 groups with a
float32 scale each (`Int8Linear`, our csrc/int8_groups.cpp: Q8_0 and Q6_K exactly). Both want
bfloat16 (or float16) activations: with float32 activations torch's int4 and int8 kernels
were 8x and 5x slower than a dense float32 matmul on the 2-core machine this was measured
on, so `auto` keeps a file's quantization only with a half-precision dtype.

Modes (`--quantization`):
- `auto`: a GGUF's linears as the file has them (Q4_0/Q4_1/Q4_K -> Int4Linear; Q8_0, Q6_K ->
  Int8Linear exactly; other quantized types -> Int8Linear rounded to 8 bits; float stays
  dense), when the activations are half precision; otherwise `none`.
- `none`: every linear dense in the model's dtype (a GGUF de-quantized, the old behaviour).
- `int4`: every linear in 4 bits (groups of 32, round-to-nearest with a min and a scale, as a
  GGUF Q4_1), from whatever the model directory holds; with `--load-format dummy`, random
  4-bit weights, so a 7B shape never exists in float at all.
- `fp16`: float16 weights through fbgemm's fp16 GEMM with float32 activations (torch.ao
  dynamic quantization); 1.3x faster than float32 at batch 1 on CPUs without bfloat16.
"""

import logging
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aserve.models import cpu_kernels
from aserve.models.gguf import GROUP, GGUFWeight, GGUFWeights, Int4Groups, Int8Groups
from aserve.models.onednn_linear import OneDNNLinear, onednn_available

log = logging.getLogger("aserve.loader")

QUANTIZATION_MODES = ("auto", "none", "int4", "fp16")
HALF = (torch.bfloat16, torch.float16)


class _WeightOnly(nn.Module):
    """A weight-only quantized linear. Its kernel dequantizes the weight once per row of x,
    so past a few rows a dense matmul is faster: `dense`, when set (`add_dense_copies`), is
    a copy in the activation dtype that batches of `dense_from` rows or more use instead."""

    dense: nn.Module | None = None  # a linear without a bias; a plain attribute, not a submodule
    dense_from = 1 << 30

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        # The kernel's own dequantization, read back through an identity: exact, whatever the layout.
        return self.quantized(torch.eye(self.in_features, dtype=dtype)).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dense(x) if self.dense is not None and x.shape[0] >= self.dense_from else self.quantized(x)
        return y if self.bias is None else y + self.bias


class Int4Linear(_WeightOnly):
    """y = x W^T (+ b) with W held as 4-bit groups: w = (q - 8) * scale + zero."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros", torch.empty(in_features // GROUP, out_features, 2))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @staticmethod
    def fits(in_features: int, out_features: int) -> bool:
        return in_features % GROUP == 0 and out_features % 16 == 0  # the packing kernel's tiles

    @staticmethod
    def buffers_from(groups: Int4Groups) -> dict[str, torch.Tensor]:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(groups.q.to(torch.int32), 1)
        return {"packed": packed,
                "scales_and_zeros": torch.stack([groups.scales.t(), groups.zeros.t()], dim=-1).contiguous()}

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_and_zeros)


class Int8Linear(_WeightOnly):
    """y = x W^T (+ b) with W held as int8 and a float32 scale per `group` weights of a row
    (GGUF's Q8_0 and Q6_K as stored), through aserve's own CPU kernel (csrc/int8_groups.cpp):
    torch's int8 weight-only kernel takes one scale per row only."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: int = 32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.register_buffer("weight_int8", torch.empty(out_features, in_features, dtype=torch.int8))
        # float32 whatever the model's dtype: the loader keeps it so (float16 scales in bfloat16 lose bits)
        self.register_buffer("scales", torch.empty(out_features, in_features // group))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    @staticmethod
    def fits(in_features: int, group: int) -> bool:
        return in_features % group == 0 and group % 16 == 0

    @staticmethod
    def buffers_from(groups: Int8Groups) -> dict[str, torch.Tensor]:
        return {"weight_int8": groups.q, "scales": groups.scales}

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.load().int8_group_mm(x, self.weight_int8, self.scales, self.group)


def new_linear(kind: str, in_features: int, out_features: int, bias: bool) -> _WeightOnly:
    """kind: "int4", or "int8:G" (groups of G)."""
    if kind == "int4":
        return Int4Linear(in_features, out_features, bias)
    return Int8Linear(in_features, out_features, bias, group=int(kind.split(":")[1]))


def quantize_int8(dense: torch.Tensor, group: int = 32) -> Int8Groups:
    """Round-to-nearest int8 groups with a scale each (a GGUF Q8_0's recipe)."""
    n, k = dense.shape
    groups = dense.float().view(n, k // group, group)
    scales = groups.abs().amax(-1) / 127
    q = torch.round(groups / scales.clamp(min=1e-30).unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return Int8Groups(q.view(n, k), scales)


def quantize_int4(dense: torch.Tensor) -> Int4Groups:
    """Round-to-nearest 4-bit groups with a min and a scale each (a GGUF Q4_1's recipe)."""
    n, k = dense.shape
    groups = dense.float().view(n, k // GROUP, GROUP)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((groups - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
    return Int4Groups(q.view(n, k), scale, lo + 8 * scale)


def random_int4(n: int, k: int, std: float, generator: torch.Generator) -> Int4Groups:
    """4-bit weights of about `std`, drawn directly: a large random model never exists in float."""
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=generator)
    scale = torch.full((n, k // GROUP), std / 4.6)  # (q - 8) has a standard deviation of 4.6
    return Int4Groups(q, scale, torch.zeros_like(scale))


def merge(parts: list[GGUFWeight]) -> GGUFWeight:
    """One weight for a fused layer (q/k/v, gate/up): 4-bit if every part is, int8 groups if
    every part has the same, else dense."""
    if all(isinstance(p, Int4Groups) for p in parts):
        return Int4Groups(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scales", "zeros")))
    if all(isinstance(p, Int8Groups) for p in parts) and len({p.group for p in parts}) == 1:
        return Int8Groups(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]))
    return torch.cat([p if isinstance(p, torch.Tensor) else p.dequantize() for p in parts])


def plan(model: nn.Module, mode: str, dtype: torch.dtype, device: torch.device,
         gguf: GGUFWeights | None) -> dict[str, str]:
    """Which linears become which quantized kind ("int4" or "int8"); the rest stay nn.Linear."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose {', '.join(QUANTIZATION_MODES)}")
    if mode in ("none", "fp16") or (mode == "auto" and (gguf is None or dtype not in HALF)):
        return {}
    if device.type != "cpu":
        # torch's CUDA int4 kernel wants a different packing, not built or tested here yet.
        if mode == "int4":
            raise ValueError("quantization 'int4' runs on CPU only for now; use dtype bfloat16 on "
                             f"{device.type}")
        return {}
    int8_ok = cpu_kernels.kernel_available()  # without the kernel an 8-bit layer stays dense
    kinds = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if mode == "int4":
            types = ["int4"]
        else:
            types = gguf.part_types(name)
            if types is None or all(t in ("F32", "F16", "BF16") for t in types):
                continue
        if all(t in ("int4", "Q4_0", "Q4_1", "Q4_K") for t in types) and Int4Linear.fits(module.in_features,
                                                                                         module.out_features):
            kinds[name] = "int4"
        elif int8_ok:
            group = 16 if set(types) == {"Q6_K"} else 32  # the file's own groups; otherwise Q8_0's
            if Int8Linear.fits(module.in_features, group):
                kinds[name] = f"int8:{group}"
    return kinds


def swap_linears(model: nn.Module, kinds: dict[str, str]) -> None:
    """Replaces the planned nn.Linear modules (of a model still on the meta device)."""
    for name, kind in kinds.items():
        old = model.get_submodule(name)
        model.set_submodule(name, new_linear(kind, old.in_features, old.out_features, old.bias is not None))


def fill_quantized(kinds: dict[str, str], state: dict[str, torch.Tensor] | None, gguf: GGUFWeights | None,
                   generator: torch.Generator | None, model: nn.Module) -> None:
    """Sets the buffers of every planned module, from the GGUF's own tensors where it has them,
    else from the dense weight in `state` (which loses it), else random (`state` is None).
    Layer by layer, each buffer replacing the untouched empty one: a 7B model's 4-bit weights
    are never held twice."""
    for name, kind in kinds.items():
        module = model.get_submodule(name)
        parts = gguf.linear(name) if gguf is not None else None
        if parts is not None:
            weight = merge(parts)
            if state is not None:
                state.pop(name + ".weight", None)
        elif state is not None:
            weight = state.pop(name + ".weight").float()
        else:
            assert generator is not None
            weight = random_int4(module.out_features, module.in_features, 0.02, generator)
        if kind == "int4":
            groups = weight if isinstance(weight, Int4Groups) else quantize_int4(
                weight if isinstance(weight, torch.Tensor) else weight.dequantize())
            buffers = Int4Linear.buffers_from(groups)
        else:
            if not (isinstance(weight, Int8Groups) and weight.group == module.group):  # else as stored, exactly
                dense = weight if isinstance(weight, torch.Tensor) else weight.dequantize()
                weight = quantize_int8(dense, module.group)
            buffers = Int8Linear.buffers_from(weight)
        for key, value in buffers.items():
            setattr(module, key, value.to(getattr(module, key).dtype))  # the dtype the loader gave it


def fp16_dynamic(model: nn.Module, device: torch.device) -> None:
    """`fp16` mode: every nn.Linear through fbgemm's fp16 GEMM (CPU, float32 model)."""
    if device.type != "cpu":
        raise ValueError(f"quantization 'fp16' runs on CPU only (fbgemm kernels); use dtype bfloat16 on {device.type}")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError("quantization 'fp16' needs torch's fbgemm kernels, which this build lacks")
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("quantization 'fp16' needs dtype float32 (it replaces the float32 matmuls)")
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, whose CPU path needs
        # torch.compile; these eager fbgemm kernels are what is fast here today.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from torch.ao.quantization import float16_dynamic_qconfig, quantize_dynamic
        except ImportError as exc:
            raise ValueError(f"quantization 'fp16' needs torch.ao.quantization, which this torch "
                             f"({torch.__version__}) lacks") from exc
        quantize_dynamic(model, {nn.Linear: float16_dynamic_qconfig}, inplace=True)


def count(model: nn.Module) -> dict[str, int]:
    """How many linears of each kind the model holds (for the start-up log)."""
    names = {Int4Linear: "int4", Int8Linear: "int8", nn.Linear: "dense", OneDNNLinear: "dense"}
    kinds: dict[str, int] = {}
    for m in model.modules():
        name = names.get(type(m)) or ("fp16" if type(m).__name__ == "Linear" else None)
        if name:
            kinds[name] = kinds.get(name, 0) + 1
    return kinds


def _seconds(fn: Callable[[], torch.Tensor], repeat: int = 7) -> float:
    """The fastest of `repeat` calls: the least disturbed by whatever else the machine runs."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.inference_mode()
def crossover(layer: _WeightOnly, dtype: torch.dtype, rows: tuple[int, ...] = (2, 4, 8, 16, 32, 64)) -> int | None:
    """The fewest rows of x at which a dense copy of `layer` multiplies faster than its
    quantized kernel, timed here (it differs between CPUs); None if it never does."""
    dense = dense_linear(layer.dequantized(dtype))
    for m in rows:
        x = torch.randn(m, layer.in_features, dtype=dtype)
        if _seconds(lambda: dense(x)) < _seconds(lambda: layer.quantized(x)):
            return m
    return None


def dense_linear(weight: torch.Tensor) -> nn.Module:
    """A bias-free linear of `weight`, prepacked for oneDNN where it can be: for bfloat16 at
    8-64 rows that was 1.1-2x faster than F.linear, which reorders the weight every call."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return OneDNNLinear(linear) if onednn_available() and weight.device.type == "cpu" else linear


def add_dense_copies(model: nn.Module, budget_bytes: int, dtype: torch.dtype) -> str:
    """Gives the quantized linears dense copies for large batches, if they all fit in
    `budget_bytes`: the small-batch decode keeps the 4-bit read, the large batch the faster
    dense matmul. Returns what was done, for the start-up log."""
    layers = [m for m in model.modules() if isinstance(m, _WeightOnly)]
    if not layers:
        return "no quantized layers"
    size = sum(m.in_features * m.out_features for m in layers) * dtype.itemsize
    if size > budget_bytes:
        return f"no dense copies for large batches ({size / 2**30:.2f} GiB would exceed dense_copy_memory)"
    thresholds = {}
    for kind in (Int4Linear, Int8Linear):
        of_kind = [m for m in layers if type(m) is kind]
        if of_kind:  # timed on the largest layer of each kind
            thresholds[kind] = crossover(max(of_kind, key=lambda m: m.in_features * m.out_features), dtype)
    for m in layers:
        if (rows := thresholds[type(m)]) is not None:
            # object.__setattr__: a plain attribute, so state_dict and .to() leave it alone
            object.__setattr__(m, "dense", dense_linear(m.dequantized(dtype)))
            m.dense_from = rows
    return "dense copies ({:.2f} GiB) for batches of {}".format(
        size / 2**30, ", ".join(f"{rows}+ rows ({kind.__name__})" if rows else f"no rows ({kind.__name__})"
                                for kind, rows in thresholds.items()))
