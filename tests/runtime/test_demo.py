"""The demo task's answers are right by construction, and the shipped demo model has learned it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from calibration.demo_task import CELLS, COLOURS, EVAL_SEED, Thing, draw, examples, scene_questions, yes_no
from pixtral.image import open_image
from pixtral.prompt import prepare_image
from pixtral.tokenizer import PixtralTokenizer
from runtime.backends.reference import ReferenceBackend
from runtime.demo.model import DEMO_SPEC, WEIGHTS_FILE, is_demo_model, write_demo_model
from runtime.engine import Engine, GenerationParams
from runtime.eval.sets import answer_item, image_items, question_messages
from runtime.sampling import SamplingParams

MIN_FP16_ACCURACY = 0.9  # the shipped weights reach ~0.965 on 256 held-out questions (weights/demo-pixtral.json)
MIN_EXAMPLE_ACCURACY = 0.8  # only 24 example questions: at 0.965, three misses is a 1-in-20 draw (it happens: 21/24)


def test_answers_follow_the_scene() -> None:
    scene = (
        Thing("circle", "red", "top left"),
        Thing("square", "red", "bottom right"),
        Thing("circle", "blue", "top right"),
    )
    qa = dict(scene_questions(scene))
    assert qa["How many shapes are there?"] == "There are three shapes."
    assert qa["How many red shapes are there?"] == "There are two red shapes."
    assert qa["How many green shapes are there?"] == "There are no green shapes."
    assert qa["What colour is the square?"] == "The square is red."
    assert "What colour is the circle?" not in qa  # two circles: ambiguous, never asked
    assert qa["Which shape is blue?"] == "The blue shape is a circle."
    assert qa["Where is the blue circle?"] == "It is in the top right."
    assert qa["What is in the bottom left?"] == "Nothing."


def test_pictures_show_the_scene() -> None:
    rng = random.Random(0)
    image = np.asarray(draw((Thing("square", "green", "bottom left"),), rng))
    quadrant = image[32:, :32].reshape(-1, 3)
    assert (quadrant == COLOURS["green"]).all(axis=1).sum() > 18 * 18  # the square's pixels, in its quadrant
    assert (image[:32] == 255).all() and (image[:, 32:] == 255).all()  # nothing elsewhere


def test_yes_no_is_true_to_the_scene() -> None:
    rng = random.Random(1)
    for _ in range(200):
        scene = (Thing("triangle", "yellow", rng.choice(CELLS)),)
        question, answer = yes_no(scene, rng)
        assert (answer == "Yes.") == (question == "Is there a yellow triangle?")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("demo") / "demo")


def test_the_demo_model_directory(demo: Path) -> None:
    assert is_demo_model(demo) and WEIGHTS_FILE.stat().st_size < 20 * 2**20
    note = json.loads(WEIGHTS_FILE.with_suffix(".json").read_text())
    assert note["spec"]["hidden_size"] == DEMO_SPEC.hidden_size and note["seconds"] > 0 and note["steps"] > 0
    questions = [json.loads(line) for line in (demo / "examples" / "questions.jsonl").read_text().splitlines()]
    assert len(questions) == 24 and all((demo / "examples" / q["image"]).is_file() for q in questions)


def test_the_shipped_weights_have_learned_the_task(demo: Path) -> None:
    tokenizer = PixtralTokenizer(demo)
    backend = ReferenceBackend(demo, "cpu")
    held_out = [e for e in examples(EVAL_SEED, 200) if e.image is not None]
    items = image_items(tokenizer, [(e.image, e.question, e.answer) for e in held_out])
    logits = backend.logits_at([(i.prompt, i.positions) for i in items])
    right = sum(bool((row.argmax(-1) == np.asarray(i.targets)).all()) for row, i in zip(logits, items))
    assert right / len(items) >= MIN_FP16_ACCURACY
    text = [e for e in examples(EVAL_SEED, 200) if e.image is None][:10]
    text_items = [answer_item(tokenizer, question_messages(e.question, None), e.answer, None) for e in text]
    text_logits = backend.logits_at([(i.prompt, i.positions) for i in text_items])
    assert sum(bool((row.argmax(-1) == np.asarray(i.targets)).all()) for row, i in zip(text_logits, text_items)) >= 8


def test_a_chat_about_a_written_example_picture_is_answered_right(demo: Path) -> None:
    engine = Engine(ReferenceBackend(demo, "cpu"), PixtralTokenizer(demo))
    questions = [json.loads(line) for line in (demo / "examples" / "questions.jsonl").read_text().splitlines()]
    pictures = [open_image(demo / "examples" / q["image"]) for q in questions]
    chat_right = []
    for q, picture in zip(questions, pictures):
        prompt = engine.chat_prompt(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q["question"]}]}],
            [prepare_image(picture)],
        )
        chat_right.append(
            engine.generate(
                prompt, GenerationParams(max_new_tokens=16, sampling=SamplingParams(temperature=0))
            ).text.strip()
            == q["answer"]
        )
    assert sum(chat_right) / len(questions) >= MIN_EXAMPLE_ACCURACY
    # greedy chat is right exactly where the teacher-forced answer is the argmax at every position
    items = image_items(engine.tokenizer, [(p, q["question"], q["answer"]) for p, q in zip(pictures, questions)])
    logits = engine.backend.logits_at([(i.prompt, i.positions) for i in items])
    assert chat_right == [bool((row.argmax(-1) == np.asarray(i.targets)).all()) for row, i in zip(logits, items)]


# the shipped weights answer 361 of the 392 turns of 128 held-out chats right (0.921, standard error
# 0.014) and 237 of the 264 turns after the first (0.898, s.e. 0.019): 0.85 is over 2.5 s.e. below both
MIN_CHAT_TURN_ACCURACY = 0.85


def test_the_shipped_weights_answer_every_turn_of_a_conversation(demo: Path) -> None:
    """Teacher-forced, as eval scores: each turn of held-out chats (follow-ups about the picture
    already sent, text questions in between, a new picture mid-chat) after the earlier right answers."""
    import torch

    from calibration.demo_task import CHAT_EVAL_SEED, conversations
    from runtime.demo.train import answer_logits, conversation_ids

    tokenizer = PixtralTokenizer(demo)
    backend = ReferenceBackend(demo, "cpu")
    right = turns = later = later_right = 0
    with torch.no_grad():
        for chat in conversations(CHAT_EVAL_SEED, 128):
            ids, pictures, spans = conversation_ids(tokenizer, chat)
            where = torch.tensor([(0, p - 1) for start, end in spans for p in range(start, end)])
            predicted = answer_logits(
                backend.model, torch.tensor([ids]), [torch.from_numpy(p.pixels) for p in pictures], where
            ).argmax(-1)
            offset = 0
            for index, (start, end) in enumerate(spans):
                ok = predicted[offset : offset + end - start].tolist() == ids[start:end]
                offset += end - start
                right, turns = right + ok, turns + 1
                later, later_right = later + (index > 0), later_right + (ok and index > 0)
    assert right / turns >= MIN_CHAT_TURN_ACCURACY and later_right / later >= MIN_CHAT_TURN_ACCURACY, (
        right / turns,
        later_right / later,
    )


def test_a_scripted_chat_with_a_follow_up_and_a_new_picture_is_answered_right(demo: Path) -> None:
    """`pixtral-exl2 chat demo` as a user types it: a picture and a question, a follow-up about the
    same picture, a sum, then a new picture and a question about it, and after /reset another. The
    questions are the example pictures' own; those the model answers right when asked alone (a new
    chat each) must still be answered right inside one conversation (trained on single questions
    only, it answered "Hello No." to a second question)."""
    from typer.testing import CliRunner

    from cli import app

    def chat(script: list[str]) -> list[str]:
        result = CliRunner().invoke(
            app,
            ["chat", str(demo), "--backend", "reference", "--temperature", "0", "--max-tokens", "16"],
            input="\n".join(script) + "\n",
        )
        assert result.exit_code == 0, result.output
        return [line.removeprefix("model>").strip() for line in result.output.splitlines() if line.startswith("model>")]

    questions = [json.loads(line) for line in (demo / "examples" / "questions.jsonl").read_text().splitlines()]
    asked = [q for q in questions if q["image"] in ("scene-1.png", "scene-2.png")]
    alone = chat(
        [line for q in asked for line in ("/reset", f"/image {demo / 'examples' / q['image']}", q["question"])]
    )
    known = [q for q, reply in zip(asked, alone) if reply == q["answer"]]
    first, second = [q for q in known if q["image"] == "scene-1.png"], [q for q in known if q["image"] == "scene-2.png"]
    assert len(first) >= 2 and len(second) >= 2, alone  # the fp16 model knows most of its example pictures
    image = lambda q: f"/image {demo / 'examples' / q['image']}"  # noqa: E731
    script = [
        image(first[0]),
        first[0]["question"],
        first[1]["question"],
        "What is 3 plus 4?",
        image(second[0]),
        second[0]["question"],
        "/reset",
        image(second[1]),
        second[1]["question"],
    ]
    assert chat(script) == [
        first[0]["answer"],
        first[1]["answer"],
        "3 plus 4 is 7.",
        second[0]["answer"],
        second[1]["answer"],
    ]
