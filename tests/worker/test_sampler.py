"""Sampler tests: greedy, top-k/top-p/min-p, seeds, penalties, logprobs, suppression (CPU, fast)."""

from __future__ import annotations

import pytest
import torch

from kvserve.sampling_params import SamplingParams
from kvserve.worker import sampler
from kvserve.worker.sampler import SamplingBatch, apply_penalties, sample

VOCAB = 64


def _batch(params: list[SamplingParams], outputs: list[list[int]] | None = None,
           suppress: list[set[int] | None] | None = None) -> SamplingBatch:
    generators = [None if p.seed is None else torch.Generator().manual_seed(p.seed)
                  for p in params]
    return SamplingBatch(params=params, output_token_ids=outputs or [[] for _ in params],
                         generators=generators, suppress_token_ids=suppress or [])


def _logits(num_reqs: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(num_reqs, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_leaves_logits_untouched() -> None:
    logits = _logits(5)
    before = logits.clone()
    out = sample(logits, _batch([SamplingParams(temperature=0.0)] * 5))
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.token_ids.dtype == torch.int64
    assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None
    assert torch.equal(logits, before)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=1.5, top_p=1e-6),
    SamplingParams(temperature=1.0, top_p=5e-324),  # 0 in float32: still keeps the top token
    SamplingParams(temperature=2.0, min_p=1.0),
    SamplingParams(temperature=1e-7),
], ids=["top_k=1", "top_p_tiny", "top_p_denormal", "min_p=1", "tiny_temperature"])
def test_filters_that_keep_one_token_equal_greedy(params: SamplingParams) -> None:
    logits = _logits(8, seed=1)
    for step in range(5):
        torch.manual_seed(step)
        out = sample(logits, _batch([params] * 8))
        assert torch.equal(out.token_ids, logits.argmax(-1))


def test_top_k_2_only_produces_the_two_top_ids() -> None:
    torch.manual_seed(0)
    logits = _logits(1, seed=2).expand(4000, VOCAB)
    out = sample(logits, _batch([SamplingParams(temperature=5.0, top_k=2)] * 4000))
    top2 = set(logits[0].topk(2).indices.tolist())
    seen = set(out.token_ids.tolist())
    assert seen == top2  # both appear at this high temperature, nothing else does


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    # probs 0.5, 0.3, 0.15, 0.05: top_p=0.75 needs the first two, 0.81 the first three.
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(3000, 4)
    for top_p, allowed in [(0.75, {0, 1}), (0.5, {0}), (0.81, {0, 1, 2})]:
        torch.manual_seed(0)
        out = sample(logits, _batch([SamplingParams(top_p=top_p)] * 3000))
        assert set(out.token_ids.tolist()) == allowed, top_p


def test_top_k_keeps_ties_with_the_kth_logit() -> None:
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    params = [SamplingParams(top_k=2), SamplingParams(top_k=-1)]
    masked = sampler._apply_top_k(logits, params)
    assert torch.isinf(masked).tolist() == [[False, False, False, True], [False] * 4]


@pytest.mark.parametrize("num_candidates", [1, 8, 64])
def test_top_p_candidates_match_a_full_sort(monkeypatch: pytest.MonkeyPatch,
                                            num_candidates: int) -> None:
    # Rounded logits make ties; a wide spread makes some rows need more than the candidates.
    scale = torch.tensor([[0.2], [1.0], [3.0], [8.0]]).repeat(4, 1)
    logits = (torch.randn(16, 300, generator=torch.Generator().manual_seed(6)) * scale).round()
    params = [SamplingParams(top_p=p) for p in [0.1, 0.5, 0.9, 0.99] * 3 + [1.0] * 4]
    full = sampler._apply_top_p(logits, params)  # 256 candidates: nearly always a full sort
    monkeypatch.setattr(sampler, "_TOP_P_CANDIDATES", num_candidates)
    assert torch.equal(sampler._apply_top_p(logits, params), full)
    monkeypatch.setattr(sampler, "_TOP_P_CANDIDATES", 10_000)
    assert torch.equal(sampler._apply_top_p(logits, params), full)
    kept = ~torch.isinf(full)
    assert kept[12:].all() and (kept.sum(-1)[:12] < 300).any()
    # Each kept set reaches top_p, and without its least likely tokens (and their ties) it
    # would not: the smallest such set.
    probs = torch.softmax(logits, dim=-1)
    for row, p in enumerate(params[:12]):
        mass = probs[row][kept[row]]
        assert mass.sum() >= p.top_p - 1e-6
        assert mass[mass > mass.min()].sum() < p.top_p + 1e-6


def test_min_p_drops_tokens_below_fraction_of_max() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(3000, 4)
    torch.manual_seed(0)
    out = sample(logits, _batch([SamplingParams(min_p=0.35)] * 3000))  # threshold 0.175
    assert set(out.token_ids.tolist()) == {0, 1}


def test_temperature_sampling_matches_softmax() -> None:
    torch.manual_seed(0)
    base = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0, -2.0]])
    num = 20000
    out = sample(base.expand(num, 6), _batch([SamplingParams(temperature=0.7)] * num))
    counts = torch.bincount(out.token_ids, minlength=6).double()
    expected = torch.softmax(base[0].double() / 0.7, dim=-1) * num
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 25.0  # 5 degrees of freedom: p < 1e-4 of a false failure


def test_seeded_rows_are_reproducible_and_independent_of_batch() -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, seed=7),
              SamplingParams(temperature=1.3, top_k=5), SamplingParams(temperature=1.0)]
    alone, alone_again, in_batch = _batch([seeded]), _batch([seeded]), _batch(others + [seeded])
    tokens_alone, tokens_again, tokens_batch = [], [], []
    for step in range(30):
        logits = _logits(5, seed=100 + step)
        tokens_alone.append(sample(logits[4:], alone).token_ids.item())
        torch.manual_seed(step)  # unseeded rows draw different global randomness than below
        tokens_again.append(sample(logits[4:], alone_again).token_ids.item())
        tokens_batch.append(sample(logits, in_batch).token_ids[4].item())
    assert tokens_alone == tokens_again == tokens_batch
    assert len(set(tokens_alone)) > 5  # it really samples


def test_apply_penalties_formula() -> None:
    logits = _logits(3, seed=3)
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
              SamplingParams(),
              SamplingParams(presence_penalty=-1.0, frequency_penalty=1.5)]
    outputs = [[3, 3, 7, 3], [1, 2], [0, 63, 63]]
    out = apply_penalties(logits, params, outputs)
    expected = logits.clone()
    for row, ids in enumerate(outputs):
        p = params[row]
        for t in set(ids):
            expected[row, t] -= p.presence_penalty + p.frequency_penalty * ids.count(t)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert out is not logits and not torch.equal(logits, out)


def test_penalties_steer_greedy_choice() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    params = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    out = sample(logits, _batch([params], outputs=[[0]]))
    assert out.token_ids.tolist() == [1]
    assert apply_penalties(logits, [SamplingParams()], [[0]]) is logits  # no-op path


def test_logprobs_come_from_raw_logits() -> None:
    torch.manual_seed(0)
    logits = _logits(4, seed=4)
    params = [SamplingParams(temperature=0.0, logprobs=3, frequency_penalty=2.0),
              SamplingParams(temperature=1.0, logprobs=0),
              SamplingParams(temperature=0.5, logprobs=5, presence_penalty=1.0),
              SamplingParams(temperature=0.0)]
    outputs = [[int(logits[0].argmax())] * 5, [], [1, 2, 3], []]
    out = sample(logits, _batch(params, outputs=outputs))
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs is not None and out.top_logprobs is not None
    assert out.top_token_ids is not None
    assert out.top_token_ids.shape == (4, 5) and out.top_logprobs.shape == (4, 5)
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    top = raw.topk(5, dim=-1)
    assert torch.equal(out.top_token_ids, top.indices)
    torch.testing.assert_close(out.top_logprobs, top.values)
    # The penalty pushed row 0 off its raw argmax: its chosen token is not the raw top-1,
    # yet its logprob is still the raw one.
    assert out.token_ids[0] != logits[0].argmax()
    assert out.logprobs[0] == raw[0, out.token_ids[0]]


def test_chosen_logprob_outside_top_k() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    out = sample(logits, _batch([SamplingParams(temperature=0.0, logprobs=1)],
                                suppress=[{0, 1, 2}]))
    assert out.token_ids.tolist() == [3]
    assert out.top_token_ids is not None and out.top_token_ids.tolist() == [[0]]
    assert out.logprobs is not None
    torch.testing.assert_close(out.logprobs, torch.log_softmax(logits, -1)[:, 3])


def test_suppressed_ids_are_never_chosen() -> None:
    torch.manual_seed(0)
    logits = _logits(1, seed=5).expand(2000, VOCAB)
    top3 = logits[0].topk(3).indices.tolist()
    params = [SamplingParams(temperature=2.0)] * 1000 + [SamplingParams(temperature=0.0)] * 1000
    suppress: list[set[int] | None] = [set(top3)] * 1999 + [None]
    out = sample(logits, _batch(params, suppress=suppress))
    assert not set(out.token_ids[:1999].tolist()) & set(top3)
    assert out.token_ids[-1].item() == top3[0]  # the unsuppressed greedy row


def test_infinite_temperature_is_rejected() -> None:
    # logits / inf would turn suppressed (-inf) logits into NaN.
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("inf"))


def test_batch_length_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="generators"):
        SamplingBatch(params=[SamplingParams()], output_token_ids=[[]], generators=[])
    with pytest.raises(ValueError, match="rows"):
        sample(_logits(2), _batch([SamplingParams()]))


def test_logit_bias_is_added_to_its_rows_only() -> None:
    logits = _logits(3, seed=5)
    params = [SamplingParams(logit_bias={3: 2.5, 7: -1.0}), SamplingParams(),
              SamplingParams(logit_bias={3: 100.0})]
    out = sampler.apply_logit_bias(logits, params)
    want = logits.clone()
    want[0, 3] += 2.5
    want[0, 7] -= 1.0
    want[2, 3] += 100.0
    assert torch.equal(out, want)
    assert sampler.apply_logit_bias(logits, [SamplingParams()] * 3) is logits  # no copy


def test_logit_bias_bans_the_greedy_token_and_forces_another() -> None:
    logits = _logits(2, seed=6)
    top = logits.argmax(dim=-1)
    least = logits.argmin(dim=-1)
    params = [SamplingParams(temperature=0.0, logit_bias={int(top[0]): -100.0}),
              SamplingParams(temperature=1.0, seed=1, logit_bias={int(least[1]): 100.0})]
    out = sample(logits, _batch(params))
    assert out.token_ids[0] == logits[0].topk(2).indices[1]  # the runner-up instead
    assert out.token_ids[1] == least[1]  # sampled, yet +100 leaves nothing else


@pytest.mark.parametrize("bias", [{-1: 1.0}, {3: 101.0}, {3: float("nan")}, {True: 1.0},
                                  ((3, 1.0), (3, 2.0))])
def test_bad_logit_bias_is_refused(bias) -> None:
    with pytest.raises(ValueError, match="SamplingParams.logit_bias"):
        SamplingParams(logit_bias=bias)
