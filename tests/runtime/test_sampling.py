"""Each sampler against a distribution worked out by hand (the numbers in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from pixtral.errors import OptionError
from runtime.sampling import (
    SamplingParams,
    apply_penalties,
    logits_to_probs,
    min_p_filter,
    sample,
    top_k_filter,
    top_p_filter,
    typical_filter,
)

# a distribution with probabilities 0.5, 0.3, 0.15, 0.05
P = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = P.log()


def _probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits, dim=-1)


def test_temperature() -> None:
    # logits [1, 0] at T = 2 -> softmax([0.5, 0]) = [e^0.5, 1] / (e^0.5 + 1)
    probs = logits_to_probs(torch.tensor([1.0, 0.0]), [], SamplingParams(temperature=2.0))
    expected = math.exp(0.5) / (math.exp(0.5) + 1)
    torch.testing.assert_close(probs, torch.tensor([expected, 1 - expected]))


def test_greedy_is_one_hot_at_the_argmax() -> None:
    probs = logits_to_probs(torch.tensor([0.1, 2.0, 1.9]), [], SamplingParams(temperature=0.0))
    assert probs.tolist() == [0.0, 1.0, 0.0]


def test_top_k() -> None:
    # keep 3 and 2 of [3, 2, 1, 0]: e^3 / (e^3 + e^2) = 1 / (1 + e^-1)
    probs = _probs(top_k_filter(torch.tensor([3.0, 2.0, 1.0, 0.0]), 2))
    first = 1 / (1 + math.exp(-1))
    torch.testing.assert_close(probs, torch.tensor([first, 1 - first, 0.0, 0.0]))


def test_top_p() -> None:
    # p = 0.7: 0.5 (mass before 0) and 0.3 (before 0.5) stay; 0.15 has 0.8 before it -> [0.625, 0.375]
    torch.testing.assert_close(_probs(top_p_filter(LOGITS, 0.7)), torch.tensor([0.625, 0.375, 0.0, 0.0]))
    # p = 0.5 exactly: the first token alone reaches it
    torch.testing.assert_close(_probs(top_p_filter(LOGITS, 0.5)), torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_min_p() -> None:
    # min_p 0.2 of the top 0.5 = 0.1: 0.05 goes; the rest renormalised by 0.95
    torch.testing.assert_close(_probs(min_p_filter(LOGITS, 0.2)), torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


def test_typical() -> None:
    # H = Σ -p ln p = 0.3466 + 0.3612 + 0.2846 + 0.1498 = 1.1422; surprises -ln p = 0.693, 1.204, 1.897, 2.996;
    # |surprise - H| = 0.449, 0.062, 0.755, 1.854 -> order 0.3, 0.5, 0.15, 0.05. Mass 0.6: 0.3 (0 before),
    # 0.5 (0.3 before) stay; 0.15 has 0.8 before it -> [0.5, 0.3] / 0.8
    torch.testing.assert_close(_probs(typical_filter(LOGITS, 0.6)), torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_repetition_penalty() -> None:
    # tokens 0 and 3 seen: positive 2 -> 2/2 = 1, negative -1 -> -1·2 = -2; others unchanged
    out = apply_penalties(torch.tensor([2.0, 1.0, 0.0, -1.0]), [0, 3, 3], SamplingParams(repetition_penalty=2.0))
    assert out.tolist() == [1.0, 1.0, 0.0, -2.0]


def test_presence_and_frequency_penalties() -> None:
    # token 1 seen twice: -0.5 (presence) - 2·0.25 (frequency) = -1; token 2 once: -0.75
    out = apply_penalties(torch.zeros(4), [1, 1, 2], SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert out.tolist() == [0.0, -1.0, -0.75, 0.0]


def test_penalty_range_looks_at_the_last_tokens_only() -> None:
    out = apply_penalties(torch.ones(4), [0, 1, 2], SamplingParams(presence_penalty=1.0, penalty_range=1))
    assert out.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_the_pipeline_order_penalties_temperature_truncation() -> None:
    # [2, 1, 0, -1] with token 0 seen (rep. penalty 2 -> 1), T = 0.5 -> [2, 2, 0, -2], top-k 2 -> [0.5, 0.5]
    params = SamplingParams(temperature=0.5, top_k=2, repetition_penalty=2.0)
    probs = logits_to_probs(torch.tensor([2.0, 1.0, 0.0, -1.0]), [0], params)
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.5, 0.0, 0.0]))


def test_a_seed_reproduces_the_draws() -> None:
    probs = torch.full((1000,), 1e-3)
    draws = [
        [sample(probs, gen) for _ in range(20)]
        for gen in (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7))
    ]
    assert draws[0] == draws[1]
    other = [sample(probs, torch.Generator().manual_seed(8)) for _ in range(20)]
    assert other != draws[0]


def test_sampling_follows_the_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([sample(P, gen) for _ in range(4000)]), minlength=4).float() / 4000
    torch.testing.assert_close(counts, P, atol=0.03, rtol=0)


@pytest.mark.parametrize(
    "field,value", [("temperature", -1.0), ("top_p", 1.5), ("min_p", -0.1), ("top_k", -3), ("seed", -1)]
)
def test_out_of_range_settings_are_refused(field: str, value: float) -> None:
    with pytest.raises(OptionError, match=field):
        SamplingParams(**{field: value})
