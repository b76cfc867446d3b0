"""What an evaluation scores, built once from the source model's tokenizer (its tiers share it).

Each item is a prompt and the positions whose next-token distribution is compared: every token of
held-out text (perplexity, KL to fp16), the answer of an image prompt (KL, top-1 agreement), the
exact answer of a demo-task question (teacher-forced: a greedy decode gives the right answer exactly
when the argmax is right at every answer position), and the choices of a multiple-choice question.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pixtral.errors import UserError
from pixtral.image import open_image
from pixtral.prompt import Prompt, PromptImage, answer_ids, prepare_image, question_messages
from pixtral.tokenizer import PixtralTokenizer

MAX_TEXT_TOKENS = 512
GENERAL_EVAL_SEED = 3  # the pictures drawn for a general model's image prompts (the demo task's eval stream number)


@dataclass(frozen=True)
class Scored:
    """A prompt, the positions scored, and the token expected after each (None: no expectation)."""

    prompt: Prompt
    positions: list[int]
    targets: list[int] | None = None


@dataclass(frozen=True)
class Choice:
    question: list[Scored]  # one scored answer per choice
    answer: int


@dataclass(frozen=True)
class EvalSet:
    text: list[Scored]
    image: list[Scored]
    task: list[Scored]
    choices: list[Choice]

    def describe(self) -> dict[str, int]:
        return {
            "text sequences": len(self.text),
            "image prompts": len(self.image),
            "task questions": len(self.task),
            "multiple-choice questions": len(self.choices),
        }


def text_items(tokenizer: PixtralTokenizer, texts: list[str], max_tokens: int = MAX_TEXT_TOKENS) -> list[Scored]:
    """Held-out text: BOS + up to `max_tokens` tokens, every next token scored."""
    items = []
    for text in texts:
        ids = [tokenizer.bos_id] + tokenizer.encode(text)[: max_tokens - 1]
        if len(ids) > 2:
            items.append(Scored(Prompt(tuple(ids)), list(range(len(ids) - 1)), ids[1:]))
    return items


def answer_item(
    tokenizer: PixtralTokenizer, messages_without: list[dict], answer: str, image: PromptImage | None
) -> Scored:
    """A chat prompt followed by `answer` and `</s>`: the answer's positions with their target tokens."""
    full, start = answer_ids(tokenizer, messages_without, answer, [image.grid] if image is not None else [])
    return Scored(
        Prompt(tuple(full), (image,) if image is not None else ()), list(range(start - 1, len(full) - 1)), full[start:]
    )


def conversation_item(
    tokenizer: PixtralTokenizer, messages_without: list[dict], answer: str, image: PromptImage | None
) -> Scored:
    """The whole exchange, every next token scored from just after the picture (or after BOS): the
    question's words too, where the model is less sure than in its answer and quantization shows."""
    item = answer_item(tokenizer, messages_without, answer, image)
    ids = list(item.prompt.token_ids)
    start = ids.index(tokenizer.image_ids.img_end) if image is not None else 0
    return Scored(item.prompt, list(range(start, len(ids) - 1)), ids[start + 1 :])


def image_items(tokenizer: PixtralTokenizer, samples: list[tuple[Image.Image, str, str]]) -> list[Scored]:
    """Image prompts (picture, question, reference answer): the answer positions, teacher-forced."""
    items = []
    for picture, question, answer in samples:
        image = prepare_image(picture)
        items.append(answer_item(tokenizer, question_messages(question, image), answer, image))
    return items


def read_choice_file(path: Path) -> list[tuple[Image.Image, str, list[str], int]]:
    """jsonl of {image, question, choices, answer}: image relative to the file, answer an index or the text."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            choices = [str(c) for c in record["choices"]]
            answer = record["answer"]
            index = answer if isinstance(answer, int) else choices.index(str(answer))
            if not (len(choices) >= 2 and 0 <= index < len(choices)):
                raise ValueError("need two or more choices and an answer among them")
            rows.append(
                (open_image(path.parent / record["image"]).convert("RGB"), str(record["question"]), choices, index)
            )
        except (KeyError, ValueError, TypeError) as err:
            raise UserError(f"{path}:{number}: expected {{image, question, choices, answer}} ({err})") from err
    if not rows:
        raise UserError(f"{path}: no questions in it")
    return rows


def choice_items(tokenizer: PixtralTokenizer, rows: list[tuple[Image.Image, str, list[str], int]]) -> list[Choice]:
    out = []
    for picture, question, choices, answer in rows:
        image = prepare_image(picture)
        messages = question_messages(question, image)
        out.append(Choice([answer_item(tokenizer, messages, choice, image) for choice in choices], answer))
    return out


def demo_eval_set(tokenizer: PixtralTokenizer, samples: int, choices: list[Choice]) -> EvalSet:
    """The demo task's held-out questions (a seed stream training and calibration never drew):
    text questions scored whole, picture questions scored after the picture (KL, top-1) and on
    their answers (exact accuracy)."""
    from calibration.demo_task import EVAL_SEED, examples

    held_out = examples(EVAL_SEED, samples)
    text = [
        conversation_item(tokenizer, question_messages(e.question, None), e.answer, None)
        for e in held_out
        if e.image is None
    ]
    pictures = [(prepare_image(e.image), e) for e in held_out if e.image is not None]
    image = [conversation_item(tokenizer, question_messages(e.question, p), e.answer, p) for p, e in pictures]
    task = [answer_item(tokenizer, question_messages(e.question, p), e.answer, p) for p, e in pictures]
    return EvalSet(text, image, task, choices)


def build_eval_set(source: Path, texts: list[Path] | None, choices: Path | None, samples: int) -> EvalSet:
    """The demo task's held-out questions for the demo model; otherwise held-out standard text and the
    calibration pictures' questions (or your own text files), plus an optional multiple-choice file."""
    from runtime.demo.model import is_demo_model

    tokenizer = PixtralTokenizer(source)
    mc = choice_items(tokenizer, read_choice_file(choices)) if choices else []
    if is_demo_model(source) and not texts:
        return demo_eval_set(tokenizer, samples, mc)
    from calibration.sources import default_image_samples, read_texts, split_documents, standard_text_files

    documents = (
        [d for path in texts for d in read_texts(path)]
        if texts
        else [
            d for path in standard_text_files().values() for d in split_documents(path.read_text(encoding="utf-8"))[-4:]
        ]
    )
    pictures = default_image_samples(GENERAL_EVAL_SEED, documents[:20])[: max(1, samples // 8)]
    return EvalSet(
        text_items(tokenizer, documents[:samples]),
        image_items(tokenizer, [(p.image, p.question, p.answer) for p in pictures]),
        [],
        mc,
    )
