"""Batched sampling: one next token per row of logits, each row with its own parameters."""

from collections.abc import Sequence

import torch

from aserve.engine.sequence import SamplingParams


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    default_generator: torch.Generator,
) -> torch.Tensor:
    """logits: [B, vocab] float32 -> token ids [B] (int64, on logits' device)."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    idx = torch.tensor(rows, device=logits.device)
    picked = [params[i] for i in rows]
    temps = torch.tensor([p.temperature for p in picked], device=logits.device, dtype=logits.dtype)
    scores = logits[idx] / temps.unsqueeze(1)
    if any(p.top_k > 0 or p.top_p < 1.0 for p in picked):
        # Only pay for a sort when some row actually truncates the distribution.
        scores = _truncate(scores, picked)
    probs = torch.softmax(scores, dim=-1)
    # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p without a
    # multinomial's host sync; a seeded row draws E from its own generator.
    noise = torch.empty_like(probs).exponential_(generator=default_generator)
    for j, i in enumerate(rows):
        if generators[i] is not None:
            noise[j].exponential_(generator=generators[i])
    tokens[idx] = (probs / noise).argmax(dim=-1)
    return tokens


def _truncate(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    vocab = scores.shape[-1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=scores.device)
    top_p = torch.tensor([p.top_p for p in params], device=scores.device, dtype=scores.dtype)
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=scores.device).unsqueeze(0)
    sorted_scores = sorted_scores.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    # Then (as vLLM and transformers do, top-k first) drop a token when the tokens ranked
    # above it already hold top_p of the remaining mass; the first token always survives.
    probs = sorted_scores.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p.unsqueeze(1)
    drop[:, 0] = False  # even a top_p that rounds to 0 in float32 keeps one token
    sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
    return torch.empty_like(scores).scatter_(-1, order, sorted_scores)
