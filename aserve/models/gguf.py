"""Linear weights read from a GGUF file as they are stored, without widening them to float.

The GGUF's config, tokenizer, norms and embeddings still come from the Hugging Face directory
that store.py converts the file into once; only the big matrices are taken from the file
itself, so a 4-bit model stays 4-bit in memory. Each tensor becomes either

- `Int4Groups`: unsigned 4-bit values with a float scale and zero per group of 32 weights,
  w = (q - 8) * scale + zero, which is exactly what torch's int4 weight-only kernels compute.
  Q4_0 (w = (q - 8) * d), Q4_1 (w = q * d + m) and Q4_K (w = d * sc * q - dmin * m per
  32-weight sub-block) map onto it without loss; the scales are exact in float32 and are
  rounded once more to the activation dtype at load (bfloat16 keeps 8 of float16's 11 bits).
- `Int8Groups`: int8 values with a float32 scale per group along a row, w = q * scale: Q8_0
  (groups of 32) and Q6_K (groups of 16; its 6-bit values and 8-bit sub-scales fit) map onto
  it without loss, the scales included (d * sc needs 19 of float32's 24 bits).
- a dense float32 matrix, for every other type (Q5_*, Q2_K, F16, ...), decoded by the `gguf`
  package's own reference dequantizers; quantize.py decides how to store it.

The block layouts decoded here are gguf-py's (`gguf.quants`), which also supplies Q4_K's
6-bit scale unpacking; tests compare every mapping with its reference dequantizer.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import Q4_K, dequantize

GROUP = 32  # weights per scale in every 4-bit type read here (Q4_K's sub-blocks included)


@dataclass(slots=True)
class Int4Groups:
    q: torch.Tensor  # uint8 [N, K], values 0..15
    scales: torch.Tensor  # float32 [N, K // 32]
    zeros: torch.Tensor  # float32 [N, K // 32]

    def dequantize(self) -> torch.Tensor:
        groups = self.q.view(self.q.shape[0], -1, GROUP).float() - 8
        return (groups * self.scales.unsqueeze(-1) + self.zeros.unsqueeze(-1)).view(self.q.shape)


@dataclass(slots=True)
class Int8Groups:
    q: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # float32 [N, K // group]

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        return (self.q.view(n, -1, self.group).float() * self.scales.unsqueeze(-1)).view(n, k)


GGUFWeight = Int4Groups | Int8Groups | torch.Tensor  # a dense weight is a float32 [N, K] tensor

INT4_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q4_K)
INT8_GROUPS = {Q.Q8_0: 32, Q.Q6_K: 16}  # the types Int8Groups holds exactly, and their group sizes


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values: low nibbles are elements 0..15, high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def decode_int4(qtype: Q, blocks: np.ndarray, rows: int) -> Int4Groups:
    """blocks: uint8 [rows, bytes per row] in the layout of `qtype` (one of INT4_TYPES)."""
    if qtype in (Q.Q4_0, Q.Q4_1):
        b = blocks.reshape(rows, -1, 18 if qtype == Q.Q4_0 else 20)  # [rows, groups, block bytes]
        d = _f16(np.ascontiguousarray(b[..., :2]))[..., 0]
        if qtype == Q.Q4_0:
            zero = np.zeros_like(d)  # w = (q - 8) * d
            qs = b[..., 2:]
        else:
            zero = _f16(np.ascontiguousarray(b[..., 2:4]))[..., 0] + 8 * d  # w = q * d + m
            qs = b[..., 4:]
        q, scale = _nibbles(qs), d
    elif qtype == Q.Q4_K:
        b = blocks.reshape(-1, 144)  # 256 weights: d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
        d, dmin = _f16(np.ascontiguousarray(b[:, 0:2])), _f16(np.ascontiguousarray(b[:, 2:4]))
        sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))  # [blocks, 8] each
        scale = d * sc.astype(np.float32)
        zero = -dmin * mn.astype(np.float32) + 8 * scale
        # Each 32-byte run holds two sub-blocks: low nibbles the first, high nibbles the second.
        qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(rows, -1, GROUP)
        scale, zero = scale.reshape(rows, -1), zero.reshape(rows, -1)
    else:
        raise ValueError(f"{qtype.name} is not a 4-bit type with 32-weight groups")
    return Int4Groups(torch.from_numpy(np.ascontiguousarray(q.reshape(rows, -1), dtype=np.uint8)),
                      torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)),
                      torch.from_numpy(np.ascontiguousarray(zero, dtype=np.float32)))


def decode_int8(qtype: Q, blocks: np.ndarray, rows: int) -> Int8Groups:
    """blocks: uint8 [rows, bytes per row] of Q8_0 or Q6_K."""
    if qtype == Q.Q8_0:
        b = blocks.reshape(rows, -1, 34)  # d (float16), then 32 int8 values
        scales = _f16(np.ascontiguousarray(b[..., :2]))[..., 0]
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, -1)
    elif qtype == Q.Q6_K:
        b = blocks.reshape(-1, 210)  # 256 weights: 128 + 64 bytes of 6-bit values, 16 int8 scales, d
        scales = (_f16(np.ascontiguousarray(b[:, 208:210])) * b[:, 192:208].view(np.int8).astype(np.float32))
        dense = dequantize(blocks, qtype).reshape(-1, 16, 16)  # = d * sc * q, exact in float32
        safe = np.where(scales == 0, 1, scales)[..., None]
        q = np.rint(dense / safe).astype(np.int8).reshape(rows, -1)
        scales = scales.reshape(rows, -1)
    else:
        raise ValueError(f"{qtype.name} is not an 8-bit group type")
    return Int8Groups(torch.from_numpy(np.ascontiguousarray(q)),
                      torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32)))


def unpermute_rope_rows(w: GGUFWeight, heads: int) -> GGUFWeight:
    """llama.cpp's converter reorders the rows of Q and K from rotate-half to interleaved RoPE
    (convert_hf_to_gguf.py `permute`); undo it. Rows are whole output channels, so the
    quantized form is reordered exactly like a dense matrix."""
    def rows(t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0]
        return t.reshape(heads, n // heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()
    if isinstance(w, Int4Groups):
        return Int4Groups(rows(w.q), rows(w.scales), rows(w.zeros))
    if isinstance(w, Int8Groups):
        return Int8Groups(rows(w.q), rows(w.scales))
    return rows(w)


class GGUFWeights:
    """The linear weights of a llama-family GGUF file, by our module names."""

    def __init__(self, path: Path, num_heads: int, num_kv_heads: int) -> None:
        self.path = path
        self.reader = GGUFReader(path)  # memory-mapped: tensors are read when asked for
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.heads = {"attn_q": num_heads, "attn_k": num_kv_heads}

    def weight(self, gguf_name: str) -> GGUFWeight:
        t = self.tensors[gguf_name]
        rows = int(t.shape[-1])  # GGUF lists dims innermost first: [K, N]
        if t.tensor_type in INT4_TYPES:
            w: GGUFWeight = decode_int4(t.tensor_type, np.asarray(t.data), rows)
        elif t.tensor_type in INT8_GROUPS:
            w = decode_int8(t.tensor_type, np.asarray(t.data), rows)
        else:
            w = torch.from_numpy(np.ascontiguousarray(dequantize(np.asarray(t.data), t.tensor_type),
                                                      dtype=np.float32)).reshape(rows, -1)
        part = gguf_name.split(".")[-2]
        return unpermute_rope_rows(w, self.heads[part]) if part in self.heads else w

    def _names(self, module: str) -> list[str]:
        if module == "lm_head":  # a tied head is the token embedding itself
            return ["output.weight" if "output.weight" in self.tensors else "token_embd.weight"]
        layer, kind = module.split(".")[1], module.split(".")[-1]
        parts = {"qkv_proj": ["attn_q", "attn_k", "attn_v"], "o_proj": ["attn_output"],
                 "gate_up_proj": ["ffn_gate", "ffn_up"], "down_proj": ["ffn_down"]}[kind]
        return [f"blk.{layer}.{p}.weight" for p in parts]

    def part_types(self, module: str) -> list[str] | None:
        """The GGUF types of the parts of one of LlamaModel's linear layers (q, k, v for
        qkv_proj; gate, up for gate_up_proj), or None where the file lacks one."""
        names = self._names(module)
        if any(n not in self.tensors for n in names):
            return None
        return [self.tensors[n].tensor_type.name for n in names]

    def linear(self, module: str) -> list[GGUFWeight] | None:
        """The parts' weights, as part_types lists them."""
        if self.part_types(module) is None:
            return None
        return [self.weight(n) for n in self._names(module)]
