"""Batched sampling: each row follows its own parameters."""

import torch

from aserve.engine.sampler import sample
from aserve.engine.sequence import SamplingParams, Sequence

VOCAB = 50


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _params(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=1, **kw)


def _sample(logits, params, generators, default_generator) -> torch.Tensor:
    seqs = [Sequence(f"s{i}", [1], p, generator=g) for i, (p, g) in enumerate(zip(params, generators))]
    return sample(logits, seqs, default_generator).tokens


def test_temperature_zero_is_argmax():
    logits = torch.randn(3, VOCAB, generator=_gen(1))
    tokens = _sample(logits, [_params(temperature=0)] * 3, [None] * 3, _gen())
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_top_k_one_always_picks_the_argmax():
    logits = torch.randn(4, VOCAB, generator=_gen(2))
    for seed in range(5):
        tokens = _sample(logits, [_params(temperature=1.5, top_k=1)] * 4, [None] * 4, _gen(seed))
        assert tokens.tolist() == logits.argmax(-1).tolist()


def test_tiny_top_p_keeps_only_the_most_likely_token():
    logits = torch.randn(4, VOCAB, generator=_gen(3))
    tokens = _sample(logits, [_params(temperature=1.0, top_p=1e-6)] * 4, [None] * 4, _gen(9))
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_top_p_that_rounds_to_zero_still_keeps_the_best_token():
    logits = torch.randn(2, VOCAB, generator=_gen(8))
    tokens = _sample(logits, [_params(temperature=1.0, top_p=1e-46)] * 2, [None] * 2, _gen(1))
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_top_k_draws_only_among_the_k_best():
    logits = torch.randn(1, VOCAB, generator=_gen(4))
    best3 = set(logits[0].topk(3).indices.tolist())
    seen = {_sample(logits, [_params(temperature=5.0, top_k=3)], [None], _gen(s)).item() for s in range(200)}
    assert seen == best3


def test_a_seeded_row_draws_the_same_token_whatever_its_neighbours():
    logits = torch.zeros(3, VOCAB)  # uniform: the draw depends on the noise alone
    seeded = _params(temperature=1.0, seed=7)
    alone = _sample(logits[:1], [seeded], [_gen(7)], _gen(0)).item()
    mixed = _sample(logits, [_params(temperature=1.0), seeded, _params(temperature=0)],
                   [None, _gen(7), None], _gen(123))
    assert mixed[1].item() == alone


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().repeat(2000, 1)
    tokens = _sample(logits, [_params(temperature=1.0)] * 2000, [None] * 2000, _gen(5))
    freq = torch.bincount(tokens, minlength=3).float() / 2000
    assert torch.allclose(freq, probs, atol=0.04)


def test_greedy_and_sampled_rows_mix_in_one_batch():
    logits = torch.randn(2, VOCAB, generator=_gen(6))
    tokens = _sample(logits, [_params(temperature=0), _params(temperature=1.0, top_k=1)], [None, None], _gen())
    assert tokens.tolist() == logits.argmax(-1).tolist()
