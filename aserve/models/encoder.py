"""Sentence-transformers encoders (BERT family) for /v1/embeddings.

The forward is transformers' own (an encoder keeps no KV cache); around it, what the model
directory's modules.json says: the Pooling module's mode (mean, cls, max or last token) and
whether a Normalize module follows (then /v1/embeddings L2-normalizes). `max_seq_length`
(sentence_bert_config.json) bounds the input, as sentence-transformers bounds it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from aserve.models.onednn_linear import pack_linears

POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "lasttoken"}
MAX_SUB_BATCH = 32
MAX_PADDING = 0.2  # a sub-batch ends before padding would pass this share of its tokens


def sub_batches(lengths: list[int]) -> list[list[int]]:
    """Indices of prompts run together: sorted by length, each group cut before its padding
    passes MAX_PADDING (or at MAX_SUB_BATCH prompts). 32 random-length sentences (3-60 words)
    padded together took 8.6 s a thousand on the 2-core EPYC; cut at 20 % padding, 6.7."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        group = groups[-1] if groups else None
        if group is None or len(group) >= MAX_SUB_BATCH or \
                lengths[i] * (len(group) + 1) > (1 + MAX_PADDING) * (real + lengths[i]):
            groups.append([i])
            real = lengths[i]
        else:
            group.append(i)
            real += lengths[i]
    return groups


def is_sentence_transformers(path: Path) -> bool:
    """A sentence-transformers directory: modules.json naming a Pooling module."""
    modules = Path(path) / "modules.json"
    return modules.is_file() and any(m.get("type", "").endswith("Pooling") for m in json.loads(modules.read_text()))


@dataclass
class Encoder:
    model: nn.Module  # transformers' AutoModel of the directory
    pooling: str  # mean | cls | max | lasttoken
    normalize: bool  # a Normalize module follows the pooling
    max_len: int  # tokens per input, special tokens included
    dimensions: int  # the embedding's size
    matryoshka: bool  # trained so that its leading dimensions are an embedding too (config says so)
    device: torch.device

    def embed(self, prompts: list[list[int]]) -> list[torch.Tensor]:
        """float32 [dimensions] per prompt, pooled, not normalized; in the prompts' order."""
        out: list[torch.Tensor | None] = [None] * len(prompts)
        for part in sub_batches([len(p) for p in prompts]):
            width = max(len(prompts[i]) for i in part)
            ids = torch.zeros(len(part), width, dtype=torch.long)
            mask = torch.zeros(len(part), width, dtype=torch.long)
            for row, i in enumerate(part):
                ids[row, :len(prompts[i])] = torch.tensor(prompts[i])
                mask[row, :len(prompts[i])] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))
            for row, vector in zip(part, self._pool(hidden.last_hidden_state.float(), mask)):
                out[row] = vector
        return out  # type: ignore[return-value]

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "mean":
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(weights == 0, -1e9).max(1).values
        return hidden[torch.arange(hidden.shape[0]), mask.sum(1) - 1]


def load_encoder(path: Path, device: torch.device, dtype: torch.dtype) -> Encoder:
    from transformers import AutoConfig, AutoModel

    path = Path(path)
    modules = json.loads((path / "modules.json").read_text())
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if unknown := [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]:
        # A Dense projection, say, changes the vectors: serving without it would be wrong.
        raise ValueError(f"{path / 'modules.json'}: the module(s) {', '.join(unknown)} are not supported; "
                         "aserve serves Transformer, Pooling and Normalize")
    pooling_dir = next(path / m["path"] for m in modules if m.get("type", "").endswith("Pooling"))
    pooling_config = json.loads((pooling_dir / "config.json").read_text())
    modes = [mode for key, mode in POOLING_MODES.items() if pooling_config.get(key)]
    if isinstance(pooling_config.get("pooling_mode"), str):  # newer sentence-transformers write the mode by name
        modes = [pooling_config["pooling_mode"]] if pooling_config["pooling_mode"] in POOLING_MODES.values() else []
        pooling_config.setdefault("word_embedding_dimension", pooling_config.get("embedding_dimension"))
    if len(modes) != 1:
        raise ValueError(f"{pooling_dir / 'config.json'}: one pooling mode of {', '.join(POOLING_MODES)} must be "
                         f"true; found {modes or 'none'}")
    config = AutoConfig.from_pretrained(path)
    max_len = config.max_position_embeddings
    if (st_config := path / "sentence_bert_config.json").is_file():
        max_len = min(max_len, json.loads(st_config.read_text()).get("max_seq_length") or max_len)
    model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
    # float32 linears prepacked for oneDNN on the CPU (onednn_linear.py): the same products to
    # 1e-6, and 32-sentence groups of all-MiniLM-L6-v2 took 5.65 s a thousand against 6.45.
    pack_linears(model)
    return Encoder(model, modes[0], any(m.get("type", "").endswith("Normalize") for m in modules), max_len,
                   pooling_config.get("word_embedding_dimension") or config.hidden_size,
                   bool(getattr(config, "is_matryoshka", False) or getattr(config, "matryoshka_dimensions", None)),
                   torch.device(device))
