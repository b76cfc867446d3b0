"""Evaluate tiers against their fp16 source on one EvalSet: perplexity and KL on text, KL and top-1
agreement on image prompts, exact-answer accuracy on the demo task, multiple-choice accuracy.

The source's distributions are computed once and kept (fp16, on the CPU) at every scored position;
each tier is then loaded alone, scored, and released, so only one model is in memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from pixtral.config import load_config
from pixtral.errors import OptionError
from pixtral.exl2.checkpoint import EXL2Checkpoint
from pixtral.weights import weights_bytes
from runtime.backends.base import Backend
from runtime.eval.sets import EvalSet, Scored


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


def tier_dirs(paths: list[Path]) -> list[Path]:
    """Tier directories, a quantize output folder standing for all its tiers, in bpw order."""
    tiers = []
    for path in paths:
        if (path / "config.json").is_file():
            tiers.append(path)
        elif path.is_dir() and sorted(path.glob("*bpw/config.json")):
            tiers += [p.parent for p in path.glob("*bpw/config.json")]
        else:
            raise OptionError(
                f"{path}: not a model directory nor a quantize output folder (no config.json, no *bpw/ tiers)"
            )
    return sorted(
        dict.fromkeys(tiers), key=lambda p: float(p.name.removesuffix("bpw")) if p.name.endswith("bpw") else 99.0
    )


def check_pairing(source: Path, tiers: list[Path]) -> None:
    """The source is an unquantized model and every tier an EXL2 quantization of that architecture."""
    source_config = load_config(source)
    if source_config.quantization is not None:
        raise OptionError(
            f"{source}: is an EXL2 checkpoint; the first argument is the fp16/bf16 source the tiers were made from"
        )
    for tier in tiers:
        if tier.resolve() == source.resolve():
            raise OptionError(f"{tier}: is the source itself; give the EXL2 tiers made from it")
        tier_config = load_config(tier)
        if tier_config.quantization is None:
            raise OptionError(f"{tier}: not an EXL2 checkpoint (config.json has no quantization_config)")
        if tier_config.text != source_config.text:
            raise OptionError(
                f"{tier}: its decoder ({tier_config.text.num_hidden_layers} layers × {tier_config.text.hidden_size}, "
                f"vocabulary {tier_config.text.vocab_size}) is not the source's "
                f"({source_config.text.num_hidden_layers} × "
                f"{source_config.text.hidden_size}, {source_config.text.vocab_size})"
            )


def describe_model(path: Path) -> tuple[float | None, float | None, int]:
    """(decoder bpw, head bpw, size of the weights) of a model directory, measured from its EXL2
    tensors (a config's `bits` is a target: exllamav2's 4.0 tiers measure 3.9975, its head "6" 8.03)."""
    with EXL2Checkpoint(path) as ckpt:
        if not ckpt.layers:
            return None, None, weights_bytes(path)
        summaries = [ckpt.summary(prefix) for prefix in ckpt.layers]
        return ckpt.decoder_bpw(summaries), ckpt.head_bpw(summaries), weights_bytes(path)


def _logits(backend: Backend, items: list[Scored]) -> list[Tensor]:
    return backend.logits_at([(item.prompt, item.positions) for item in items]) if items else []


@dataclass(frozen=True)
class SetLogits:
    """One model's logits at the scored positions of each item of an EvalSet's scored sets."""

    text: list[Tensor]
    image: list[Tensor]
    task: list[Tensor]


def _set_logits(backend: Backend, eval_set: EvalSet) -> SetLogits:
    """Logits of the text, image and task items, each distinct prompt run once: the demo's image
    and task items are the same prompts scored at different positions."""
    sets = (eval_set.text, eval_set.image, eval_set.task)
    wanted: dict[tuple, tuple[Scored, set[int]]] = {}
    for items in sets:
        for item in items:
            key = (item.prompt.token_ids, tuple(image.key for image in item.prompt.images))
            wanted.setdefault(key, (item, set()))[1].update(item.positions)
    runs = [Scored(item.prompt, sorted(positions)) for item, positions in wanted.values()]
    by_key = {
        key: (rows, {p: i for i, p in enumerate(run.positions)})
        for key, run, rows in zip(wanted, runs, _logits(backend, runs))
    }

    def rows_of(items: list[Scored]) -> list[Tensor]:
        out = []
        for item in items:
            rows, index = by_key[(item.prompt.token_ids, tuple(image.key for image in item.prompt.images))]
            out.append(rows[[index[p] for p in item.positions]])
        return out

    return SetLogits(*(rows_of(items) for items in sets))


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
            scores.append(
                float(
                    torch.log_softmax(row.float(), -1)[
                        torch.arange(len(answer.targets)), torch.tensor(answer.targets)
                    ].mean()
                )
            )
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
    source_logits = _set_logits(backend, eval_set)
    # fp16 on the CPU: the reference distributions are kept while every tier runs
    reference = SetLogits(
        [t.to(torch.float16) for t in source_logits.text], [t.to(torch.float16) for t in source_logits.image], []
    )
    scores = [_score(backend, source, "fp16", eval_set, reference, source_logits)]
    del source_logits
    backend.close()
    progress("fp16", 1, total)
    for done, tier in enumerate(tiers, start=2):
        backend = load(tier)
        scores.append(_score(backend, tier, tier.name, eval_set, reference, _set_logits(backend, eval_set)))
        backend.close()
        progress(tier.name, done, total)
    return scores


def _score(
    backend: Backend, path: Path, name: str, eval_set: EvalSet, reference: SetLogits, logits: SetLogits
) -> ModelScore:
    """Scores of one model from its logits on the text, image and task items (`_set_logits`)."""
    bpw, head_bpw, size = describe_model(path)
    score = ModelScore(name, str(path), bpw, head_bpw, size)
    if eval_set.text:
        score.text_ppl = math.exp(_mean_nll(logits.text, eval_set.text))
        score.text_kl, _ = _kl_and_top1(reference.text, logits.text)
    if eval_set.image:
        score.image_kl, score.image_top1 = _kl_and_top1(reference.image, logits.image)
    if eval_set.task:
        score.task_accuracy = _exact(logits.task, eval_set.task)
    score.choice_accuracy = _choice_accuracy(backend, eval_set)
    return score
