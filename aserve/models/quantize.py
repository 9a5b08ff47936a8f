"""Optional CPU weight quantization of the model's linear layers.

Decode at small batch is bound by reading the weights. ``fp16`` stores the linear weights
as float16 and runs them through fbgemm's fp16 GEMM (torch.ao dynamic quantization), with
float32 activations and accumulation: 1.3x faster than the float32 oneDNN path at batch 1,
no faster at batch 32, and greedy output identical to float32 on the prompt set of
bench/quantization.py. Embeddings, norms and the KV cache stay float32.

int8 is deliberately not offered: fbgemm's dynamic int8 (int8 activations too) changed
greedy output within a few tokens on SmolLM2-135M, with per-tensor or per-channel weights
and with lm_head left in float32 (README "Quantization"), and torch's weight-only int8
kernel (``_weight_int8pack_mm``) was slower than float32 on CPU. CPU only: fbgemm has no
CUDA kernels.
"""

import warnings

import torch
from torch import nn

QUANTIZATION_MODES = ("none", "fp16")


def quantize_linears(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """Replaces every nn.Linear in `model` in place; returns the model."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose {', '.join(QUANTIZATION_MODES)}")
    if mode == "none":
        return model
    if device.type != "cpu":
        raise ValueError(f"quantization {mode!r} runs on CPU only (fbgemm kernels); use dtype bfloat16 on {device.type}")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise ValueError(f"quantization {mode!r} needs torch's fbgemm kernels, which this build lacks")
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError(f"quantization {mode!r} needs dtype float32 (it replaces the float32 matmuls)")
    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, whose CPU path needs
        # torch.compile; these eager fbgemm kernels are what is fast here today.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from torch.ao.quantization import float16_dynamic_qconfig, quantize_dynamic
        except ImportError as exc:
            raise ValueError(f"quantization {mode!r} needs torch.ao.quantization, which this torch "
                             f"({torch.__version__}) lacks") from exc
        quantize_dynamic(model, {nn.Linear: float16_dynamic_qconfig}, inplace=True)
    return model
