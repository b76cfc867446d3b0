"""Sampling as small pure functions over one position's logits [vocab] (gpt-fast's logits_to_probs).

Order, as in HF transformers and exllamav2: penalties on the raw logits, temperature, then the
truncations (top-k, top-p, min-p, typical), softmax, and one draw from a seeded generator.
`temperature == 0` is greedy. Every function returns a new tensor; nothing is changed in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pixtral.errors import check_range


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn; the defaults sample from the model's distribution unchanged."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    typical: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # CTRL-style: >1 discourages tokens already present
    presence_penalty: float = 0.0  # OpenAI-style: subtract once per token present
    frequency_penalty: float = 0.0  # OpenAI-style: subtract per occurrence
    penalty_range: int = 0  # last N tokens the penalties look at; 0 = all of prompt and output
    seed: int | None = None

    def __post_init__(self) -> None:
        check_range("temperature", self.temperature, 0.0, 100.0, "a number")
        check_range("top_k", self.top_k, 0, 1 << 31)
        check_range("top_p", self.top_p, 0.0, 1.0, "a number")
        check_range("min_p", self.min_p, 0.0, 1.0, "a number")
        check_range("typical", self.typical, 0.0, 1.0, "a number")
        check_range("repetition_penalty", self.repetition_penalty, 0.01, 100.0, "a number")
        check_range("presence_penalty", self.presence_penalty, -2.0, 2.0, "a number")
        check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "a number")
        check_range("penalty_range", self.penalty_range, 0, 1 << 31)
        if self.seed is not None:
            check_range("seed", self.seed, 0, 2**63 - 1)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def apply_penalties(logits: Tensor, history: Sequence[int], params: SamplingParams) -> Tensor:
    """Repetition (divide positive / multiply negative logits), presence and frequency penalties."""
    if not history or (
        params.repetition_penalty == 1.0 and params.presence_penalty == 0.0 and params.frequency_penalty == 0.0
    ):
        return logits
    window = history[-params.penalty_range :] if params.penalty_range else history
    ids, counts = torch.unique(torch.as_tensor(list(window), device=logits.device), return_counts=True)
    chosen = logits[ids]
    if params.repetition_penalty != 1.0:
        chosen = torch.where(chosen > 0, chosen / params.repetition_penalty, chosen * params.repetition_penalty)
    chosen = chosen - params.presence_penalty - params.frequency_penalty * counts.to(chosen.dtype)
    out = logits.clone()
    out[ids] = chosen
    return out


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits (ties with the k-th kept too)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    return _keep_leading_mass(logits, order, torch.softmax(sorted_logits, dim=-1), p)


def min_p_filter(logits: Tensor, p: float) -> Tensor:
    """Drop tokens less likely than p times the most likely one."""
    if p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < p * probs.max(), float("-inf"))


def typical_filter(logits: Tensor, mass: float) -> Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to `mass`."""
    if mass >= 1.0:
        return logits
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    entropy = -(probs * torch.nan_to_num(log_probs, neginf=0.0)).sum()
    deviation = (-log_probs - entropy).abs()
    order = torch.argsort(deviation)
    return _keep_leading_mass(logits, order, probs[order], mass)


def _keep_leading_mass(logits: Tensor, order: Tensor, ordered_probs: Tensor, mass: float) -> Tensor:
    """Keep tokens in `order` until their probability reaches `mass` (the first always kept)."""
    before = torch.cumsum(ordered_probs, dim=-1) - ordered_probs  # mass of the tokens ahead in order
    drop_ordered = before >= mass
    drop_ordered[0] = False
    return logits.masked_fill(torch.zeros_like(drop_ordered).scatter(0, order, drop_ordered), float("-inf"))


def logits_to_probs(logits: Tensor, history: Sequence[int], params: SamplingParams) -> Tensor:
    """The distribution the next token is drawn from (one-hot at the argmax when greedy)."""
    logits = apply_penalties(logits.float(), history, params)
    if params.greedy:
        return torch.nn.functional.one_hot(torch.argmax(logits), logits.shape[-1]).float()
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    logits = min_p_filter(logits, params.min_p)
    logits = typical_filter(logits, params.typical)
    return torch.softmax(logits, dim=-1)


def sample(probs: Tensor, generator: torch.Generator | None = None) -> int:
    """One token id drawn from `probs` [vocab]."""
    return int(torch.multinomial(probs, 1, generator=generator))


def next_token(
    logits: Tensor, history: Sequence[int], params: SamplingParams, generator: torch.Generator | None = None
) -> int:
    """The next token: the argmax when greedy (no distribution built), else a draw from logits_to_probs."""
    if params.greedy:
        return int(torch.argmax(apply_penalties(logits, history, params)))
    return sample(logits_to_probs(logits, history, params), generator)
