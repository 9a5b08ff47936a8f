"""Batched sampling: one next token per row of logits, each row with its own parameters.

Order, as in vLLM: logit_bias, min_tokens, penalties, the guided-decoding mask, then
temperature, top-k/top-p and the draw. Each stage runs only for the rows that ask for it,
so a batch of plain requests pays for none of them. Logprobs are those of the model's own
distribution (the raw logits, before any of the stages), which is vLLM's default.
"""

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from aserve.engine import guided
from aserve.engine.sequence import SamplingParams
from aserve.engine.sequence import Sequence as Seq


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens with their logprobs, best first


@dataclass(slots=True)
class SampleOutput:
    tokens: torch.Tensor  # [B] int64
    logprob_rows: list[int]  # rows that asked for logprobs
    chosen: torch.Tensor | None = None  # [len(logprob_rows)] logprob of each row's sampled token
    top_values: torch.Tensor | None = None  # [len(logprob_rows), k] k = the largest asked
    top_ids: torch.Tensor | None = None

    def to_host(self, seqs: Sequence[Seq]) -> tuple[list[int], list[TokenLogprobs | None]]:
        tokens = self.tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * len(tokens)
        if self.logprob_rows:
            chosen, values, ids = self.chosen.tolist(), self.top_values.tolist(), self.top_ids.tolist()
            for j, i in enumerate(self.logprob_rows):
                k = seqs[i].params.logprobs or 0
                logprobs[i] = TokenLogprobs(tokens[i], chosen[j], tuple(zip(ids[j][:k], values[j][:k])))
        return tokens, logprobs


def sample(
    logits: torch.Tensor,
    seqs: Sequence[Seq],
    default_generator: torch.Generator,
    eos_token_ids: Collection[int] = (),
) -> SampleOutput:
    """logits: [B, vocab] float32, one row per sequence -> the next token of each."""
    logprob_rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    raw_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1) if logprob_rows else None
    logits = _process(logits, seqs, eos_token_ids)
    tokens = _draw(logits, [s.params for s in seqs], [s.generator for s in seqs], default_generator)
    out = SampleOutput(tokens, logprob_rows)
    if raw_logprobs is not None:
        rows = torch.tensor(logprob_rows, device=logits.device)
        out.chosen = raw_logprobs.gather(1, tokens[rows].unsqueeze(1)).squeeze(1)
        k = max(seqs[i].params.logprobs or 0 for i in logprob_rows)
        out.top_values, out.top_ids = raw_logprobs.topk(k, dim=-1) if k else (raw_logprobs[:, :0],) * 2
    return out


def prompt_logprobs(logits: torch.Tensor, next_tokens: Sequence[int], k: int) -> list[TokenLogprobs]:
    """logits: [n, vocab], row j predicting next_tokens[j] (a prompt token)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs.gather(1, torch.tensor(next_tokens, device=logits.device).unsqueeze(1)).squeeze(1).tolist()
    values, ids = (v.tolist() for v in logprobs.topk(k, dim=-1)) if k else ([[]] * len(chosen),) * 2
    return [TokenLogprobs(t, c, tuple(zip(i, v))) for t, c, i, v in zip(next_tokens, chosen, ids, values)]


def _process(logits: torch.Tensor, seqs: Sequence[Seq], eos_token_ids: Collection[int]) -> torch.Tensor:
    """The logits processors; returns `logits` itself when no row needs one."""
    biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    # A finished grammar allows only EOS: it wins over min_tokens, or the row would have no token left.
    held = [i for i, s in enumerate(seqs) if len(s.output_ids) < s.params.min_tokens
            and not (s.guide is not None and s.guide.is_terminated)]
    penalized = [i for i, s in enumerate(seqs) if s.params.penalized]
    guides = [s.guide for s in seqs]
    if not (biased or held or penalized or any(g is not None for g in guides)):
        return logits
    logits = logits.clone()  # the raw logits may still be read for logprobs
    vocab = logits.shape[-1]
    for i in biased:
        # Ids past the logits (a tokenizer's added tokens beyond the model's vocab) cannot be drawn anyway.
        pairs = [(t, b) for t, b in seqs[i].params.logit_bias if t < vocab]
        if pairs:
            ids, bias = zip(*pairs)
            logits[i, list(ids)] += torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    for i in held:
        ends = [t for t in (*eos_token_ids, *seqs[i].params.stop_token_ids) if t < vocab]
        logits[i, ends] = float("-inf")
    for i in penalized:
        _penalize(logits[i], seqs[i])
    if any(g is not None for g in guides):
        guided.apply_masks(logits, guides)
    return logits


def _penalize(row: torch.Tensor, seq: Seq) -> None:
    p, vocab = seq.params, row.shape[-1]
    output = torch.tensor(seq.output_ids, dtype=torch.long, device=row.device)
    counts = torch.bincount(output, minlength=vocab)[:vocab].to(row.dtype)
    if p.repetition_penalty != 1.0:
        prompt = torch.tensor(seq.prompt_ids, dtype=torch.long, device=row.device)
        seen = (counts > 0) | (torch.bincount(prompt, minlength=vocab)[:vocab] > 0)
        # As in transformers and vLLM: shrink positive logits, push negative ones further down.
        penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
        row.copy_(torch.where(seen, penalized, row))
    if p.frequency_penalty or p.presence_penalty:
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _draw(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    default_generator: torch.Generator,
) -> torch.Tensor:
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
    # Inverse-CDF sampling: one uniform number per row, found in the row's cumulative
    # distribution. A race over per-token noise (Gumbel, exponential) needs one random number
    # per vocabulary entry: at batch 32 that was 40 ms a step on CPU (80 ms seeded), more than a
    # third of the forward. No host sync either way; a seeded row draws from its own generator.
    uniform = torch.rand(len(rows), 1, generator=default_generator, device=logits.device, dtype=probs.dtype)
    for j, i in enumerate(rows):
        if generators[i] is not None:
            uniform[j] = torch.rand(1, generator=generators[i], device=logits.device, dtype=probs.dtype)
    cdf = probs.cumsum(dim=-1)
    # The first token whose cumulative mass exceeds u: a token of zero probability never is.
    drawn = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).squeeze(1)
    tokens[idx] = drawn.clamp_(max=probs.shape[-1] - 1)
    return tokens


# Top-p is decided among each row's likeliest tokens first: a top-k of 1,024 of them costs a
# fraction of sorting the whole vocabulary (at batch 32 on CPU the sort was 70 ms a step). Only
# a row whose candidates hold less than its top_p of the mass (a very flat distribution) is
# sorted whole.
TOP_P_CANDIDATES = 1024


def _truncate(scores: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Top-k, then (as vLLM and transformers do) top-p over what top-k kept: a token is dropped
    when the tokens ranked above it already hold top_p of that mass; the first always stays."""
    vocab = scores.shape[-1]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=scores.device)
    top_p = torch.tensor([p.top_p for p in params], device=scores.device, dtype=scores.dtype)
    truncates = (top_k < vocab) | (top_p < 1.0)
    if scores.device.type != "cpu":  # a GPU sorts fast, and checking coverage would cost a host sync
        return torch.where(truncates.unsqueeze(1), _truncate_sorted(scores, top_k, top_p), scores)
    k = min(vocab, max([TOP_P_CANDIDATES] + [p.top_k for p in params if 0 < p.top_k < vocab]))
    values, order = scores.topk(k, dim=-1)  # descending
    values = values.masked_fill(torch.arange(k, device=scores.device) >= top_k.unsqueeze(1), float("-inf"))
    # The mass top-p measures: the kept top-k (all among the candidates), else the whole row.
    in_candidates = (top_k <= k).unsqueeze(1)
    norm = torch.where(in_candidates, values.logsumexp(-1, keepdim=True), scores.logsumexp(-1, keepdim=True))
    probs = (values - norm).exp()
    kept = _drop_past_top_p(values, probs, top_p)
    out = torch.full_like(scores, float("-inf")).scatter_(-1, order, kept)
    covered = in_candidates.squeeze(1) | (probs.sum(-1) >= top_p)
    if not bool(covered.all()):
        rows = (~covered).nonzero().squeeze(1)
        out[rows] = _truncate_sorted(scores[rows], top_k[rows], top_p[rows])
    return torch.where(truncates.unsqueeze(1), out, scores)


def _truncate_sorted(scores: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The same over a whole sorted vocabulary."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    ranks = torch.arange(scores.shape[-1], device=scores.device).unsqueeze(0)
    sorted_scores = sorted_scores.masked_fill(ranks >= top_k.unsqueeze(1), float("-inf"))
    kept = _drop_past_top_p(sorted_scores, sorted_scores.softmax(dim=-1), top_p)
    return torch.empty_like(scores).scatter_(-1, order, kept)


def _drop_past_top_p(sorted_scores: torch.Tensor, probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    mass_before = probs.cumsum(dim=-1) - probs
    drop = mass_before >= top_p.unsqueeze(1)
    drop[:, 0] = False  # even a top_p that rounds to 0 in float32 keeps one token
    return sorted_scores.masked_fill(drop, float("-inf"))
