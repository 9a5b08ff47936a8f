"""Batched sampling: each row follows its own parameters."""

import pytest
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


def _one(logits: torch.Tensor, output: list[int] = (), prompt: list[int] = (1,), eos=(), **kw):
    seq = Sequence("s", list(prompt), SamplingParams(max_tokens=9, temperature=0, **kw), output_ids=list(output))
    return sample(logits.unsqueeze(0), [seq], _gen(), eos), seq


def test_frequency_penalty_grows_with_each_occurrence():
    logits = torch.zeros(VOCAB)
    logits[3], logits[4] = 3.0, 2.0
    assert _one(logits, [3], frequency_penalty=0.9)[0].tokens.item() == 3  # 3 - 0.9 > 2
    assert _one(logits, [3, 3], frequency_penalty=0.9)[0].tokens.item() == 4  # 3 - 1.8 < 2


def test_presence_penalty_counts_a_token_once():
    logits = torch.zeros(VOCAB)
    logits[3], logits[4] = 3.0, 2.0
    assert _one(logits, [3, 3, 3], presence_penalty=0.9)[0].tokens.item() == 3
    assert _one(logits, [3], presence_penalty=1.5)[0].tokens.item() == 4


def test_repetition_penalty_covers_prompt_tokens_and_divides_positive_logits():
    logits = torch.zeros(VOCAB)
    logits[3], logits[4] = 3.0, 2.0
    assert _one(logits, prompt=[3], repetition_penalty=2.0)[0].tokens.item() == 4  # 3 / 2 < 2
    assert _one(logits, prompt=[5], repetition_penalty=2.0)[0].tokens.item() == 3


def test_repetition_penalty_multiplies_negative_logits():
    logits = torch.full((VOCAB,), -1.0)
    logits[3] = -0.5
    assert _one(logits, prompt=[5], repetition_penalty=3.0)[0].tokens.item() == 3
    assert _one(logits, prompt=[3], repetition_penalty=3.0)[0].tokens.item() != 3  # -1.5 < -1


def test_logit_bias_is_added():
    logits = torch.zeros(VOCAB)
    logits[3] = 3.0
    assert _one(logits, logit_bias=((7, 3.5),))[0].tokens.item() == 7


def test_min_tokens_masks_eos_and_stop_token_ids():
    logits = torch.zeros(VOCAB)
    logits[2], logits[6], logits[4] = 9.0, 8.0, 1.0
    assert _one(logits, [1], eos=(2,), min_tokens=2, stop_token_ids=(6,))[0].tokens.item() == 4
    assert _one(logits, [1, 1], eos=(2,), min_tokens=2, stop_token_ids=(6,))[0].tokens.item() == 2


def test_logprobs_are_the_raw_distributions():
    logits = torch.randn(VOCAB, generator=_gen(3))
    out, seq = _one(logits, logprobs=3, logit_bias=((0, 50.0),))
    tokens, logprobs = out.to_host([seq])
    expected = torch.log_softmax(logits, -1)
    assert tokens == [0]  # the bias decides the token, not the reported logprobs
    assert logprobs[0].logprob == pytest.approx(expected[0].item(), abs=1e-5)
    top = expected.topk(3)
    assert [t for t, _ in logprobs[0].top] == top.indices.tolist()
    assert [v for _, v in logprobs[0].top] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_a_finished_grammar_wins_over_min_tokens():
    class Done:
        is_terminated = True

    logits = torch.zeros(VOCAB)
    logits[5] = 4.0
    seq = Sequence("s", [1], SamplingParams(max_tokens=9, temperature=0, min_tokens=5), guide=None)
    seq.guide = Done()
    import aserve.engine.guided as guided

    allowed = torch.zeros(VOCAB, dtype=torch.bool)
    allowed[2] = True  # the grammar allows only EOS; the rest of the row is what the sampler made it
    original = guided.apply_masks
    try:
        guided.apply_masks = lambda lg, guides: lg.masked_fill_(~allowed, float("-inf"))
        assert sample(logits.unsqueeze(0), [seq], _gen(), (2,)).tokens.item() == 2
    finally:
        guided.apply_masks = original


@pytest.mark.parametrize("scale", [8.0, 0.5])  # peaked rows (top-p decided among candidates) and flat ones (full sort)
def test_top_p_among_candidates_keeps_the_same_tokens_as_a_full_sort(scale):
    from aserve.engine.sampler import TOP_P_CANDIDATES, _truncate, _truncate_sorted

    torch.manual_seed(0)
    vocab = 4 * TOP_P_CANDIDATES
    scores = torch.randn(6, vocab) * scale
    params = [SamplingParams(max_tokens=1, top_p=0.9), SamplingParams(max_tokens=1, top_k=50),
              SamplingParams(max_tokens=1, top_k=3000, top_p=0.95), SamplingParams(max_tokens=1, top_p=0.5),
              SamplingParams(max_tokens=1), SamplingParams(max_tokens=1, top_k=vocab + 1, top_p=0.99)]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    expected = _truncate_sorted(scores, top_k, top_p)
    expected[4] = scores[4]  # a row that truncates nothing keeps its scores
    got = _truncate(scores, params)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.equal(got[~torch.isinf(got)], scores[~torch.isinf(got)])
