"""Evaluate tiers against their fp16 source on one EvalSet: perplexity and KL on text, KL and top-1
agreement on image prompts, exact-answer accuracy on the demo task, multiple-choice accuracy.

The source's distributions are computed once and kept (fp16, on the CPU) at every scored position;
each tier is then loaded alone, scored, and released, so only one model is in memory at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..backends.base import Backend
from .sets import EvalSet, Scored


@dataclass
class ModelScore:
    name: str
    path: str
    bpw: float | None  # decoder bpw; None for the fp16 source
    head_bpw: float | None
    size_bytes: int
    text_ppl: float | None = None
    text_kl: float | None = None
    image_kl: float | None = None
    image_top1: float | None = None
    task_accuracy: float | None = None
    choice_accuracy: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def describe_model(path: Path) -> tuple[float | None, float | None, int]:
    """(decoder bpw, head bpw, size of the weights) of a model directory."""
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization_config") or {}
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    return quant.get("decoder_bpw", quant.get("bits")), quant.get("head_bpw", quant.get("head_bits")), size


def _logits(backend: Backend, items: list[Scored]) -> list[Tensor]:
    return backend.logits_at([(item.prompt, item.positions) for item in items]) if items else []


def _mean_nll(logits: list[Tensor], items: list[Scored]) -> float:
    total = count = 0.0
    for row, item in zip(logits, items):
        total += float(torch.nn.functional.cross_entropy(row.float(), torch.tensor(item.targets), reduction="sum"))
        count += len(item.targets or [])
    return total / max(count, 1)


def _kl_and_top1(reference: list[Tensor], logits: list[Tensor]) -> tuple[float, float]:
    kl_sum = agree = positions = 0.0
    for ref, row in zip(reference, logits):
        log_p, log_q = torch.log_softmax(ref.float(), -1), torch.log_softmax(row.float(), -1)
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
        agree += float((ref.argmax(-1) == row.argmax(-1)).sum())
        positions += ref.shape[0]
    return kl_sum / max(positions, 1), agree / max(positions, 1)


def _exact(logits: list[Tensor], items: list[Scored]) -> float:
    right = sum(bool((row.argmax(-1) == torch.tensor(item.targets)).all()) for row, item in zip(logits, items))
    return right / max(len(items), 1)


def _choice_accuracy(backend: Backend, eval_set: EvalSet) -> float | None:
    if not eval_set.choices:
        return None
    flat = [answer for question in eval_set.choices for answer in question.question]
    logits = iter(_logits(backend, flat))
    right = 0
    for question in eval_set.choices:
        scores = []
        for answer in question.question:
            row = next(logits)
            scores.append(float(torch.log_softmax(row.float(), -1)[torch.arange(len(answer.targets)), torch.tensor(answer.targets)].mean()))
        right += int(max(range(len(scores)), key=scores.__getitem__) == question.answer)
    return right / len(eval_set.choices)


def evaluate(
    source: Path,
    tiers: list[Path],
    eval_set: EvalSet,
    load: Callable[[Path], Backend],
    progress: Callable[[str, int, int], None] = lambda name, done, total: None,
) -> list[ModelScore]:
    """Scores of the source (first) and of each tier."""
    total = 1 + len(tiers)
    progress("fp16", 0, total)
    backend = load(source)
    reference = {name: [t.to(torch.float16) for t in _logits(backend, getattr(eval_set, name))] for name in ("text", "image")}
    scores = [_score(backend, source, "fp16", eval_set, reference)]
    backend.close()
    progress("fp16", 1, total)
    for done, tier in enumerate(tiers, start=2):
        backend = load(tier)
        scores.append(_score(backend, tier, tier.name, eval_set, reference))
        backend.close()
        progress(tier.name, done, total)
    return scores


def _score(backend: Backend, path: Path, name: str, eval_set: EvalSet, reference: dict[str, list[Tensor]]) -> ModelScore:
    bpw, head_bpw, size = describe_model(path)
    score = ModelScore(name, str(path), bpw, head_bpw, size)
    computed: dict[int, list[Tensor]] = {}  # the demo's image set is its task set: score it once

    def logits(items: list[Scored]) -> list[Tensor]:
        if id(items) not in computed:
            computed[id(items)] = _logits(backend, items)
        return computed[id(items)]

    if eval_set.text:
        text = logits(eval_set.text)
        score.text_ppl = math.exp(_mean_nll(text, eval_set.text))
        score.text_kl, _ = _kl_and_top1(reference["text"], text)
    if eval_set.image:
        score.image_kl, score.image_top1 = _kl_and_top1(reference["image"], logits(eval_set.image))
    if eval_set.task:
        score.task_accuracy = _exact(logits(eval_set.task), eval_set.task)
    score.choice_accuracy = _choice_accuracy(backend, eval_set)
    return score
