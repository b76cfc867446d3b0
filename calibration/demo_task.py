"""The demo model's task: drawn scenes of coloured shapes, and questions whose answers need vision.

A 64×64 picture (a 4×4 grid of Pixtral patches) holds one to three shapes (circle, square, triangle)
in red, green, blue or yellow, each in a quadrant. Questions ask for counts, colours, shapes,
positions and yes/no, answered in one short sentence that is right by construction; a little text
(sums of one-digit numbers, a greeting) keeps the decoder a language model too. Conversations of
several turns ask follow-ups about the same picture, text questions in between, and a new picture
mid-chat (questions are then about the newest picture). Everything comes from a seeded RNG, so
training, calibration and evaluation draw from disjoint, reproducible streams.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 38, 38), "green": (34, 160, 60), "blue": (38, 78, 215), "yellow": (230, 190, 20)}
CELLS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("no", "one", "two", "three")
IMAGE_SIZE = 64
# disjoint seed streams: the shipped weights were trained on TRAIN_SEED; calibration and evaluation
# never see those scenes
TRAIN_SEED, CALIBRATION_SEED, EVAL_SEED = 1, 2, 3
CHAT_EVAL_SEED = EVAL_SEED + 100  # held-out conversations (training draws its chats from the training stream)


@dataclass(frozen=True)
class Thing:
    """One shape in a scene: which shape, which colour, which quadrant (cell)."""

    shape: str
    colour: str
    cell: str


@dataclass(frozen=True)
class Example:
    """One question with its answer; `image` is None for the text-only questions."""

    question: str
    answer: str
    image: Image.Image | None = None


@dataclass(frozen=True)
class Turn:
    """One user turn of a conversation and its answer; `image` is a new picture sent with it."""

    question: str
    answer: str
    image: Image.Image | None = None


def random_scene(rng: random.Random) -> tuple[Thing, ...]:
    cells = rng.sample(CELLS, rng.randint(1, 3))
    return tuple(Thing(rng.choice(SHAPES), rng.choice(list(COLOURS)), cell) for cell in cells)


def draw(scene: tuple[Thing, ...], rng: random.Random) -> Image.Image:
    """White background, each shape inside its 32×32 quadrant with a little jitter in size and place."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    pen = ImageDraw.Draw(image)
    for thing in scene:
        row, col = divmod(CELLS.index(thing.cell), 2)
        size = rng.randint(18, 26)
        x0 = col * 32 + rng.randint(1, 31 - size)
        y0 = row * 32 + rng.randint(1, 31 - size)
        box = (x0, y0, x0 + size, y0 + size)
        fill = COLOURS[thing.colour]
        if thing.shape == "circle":
            pen.ellipse(box, fill=fill)
        elif thing.shape == "square":
            pen.rectangle(box, fill=fill)
        else:
            pen.polygon([(x0 + size / 2, y0), (x0, y0 + size), (x0 + size, y0 + size)], fill=fill)
    return image


def _plural(count: int, noun: str) -> str:
    return f"{NUMBERS[count]} {noun}" + ("" if count == 1 else "s")


def scene_questions(scene: tuple[Thing, ...]) -> list[tuple[str, str]]:
    """Every (question, answer) this scene answers unambiguously."""
    out = [
        ("How many shapes are there?", f"There {'is' if len(scene) == 1 else 'are'} {_plural(len(scene), 'shape')}.")
    ]
    for shape in SHAPES:
        found = [t for t in scene if t.shape == shape]
        if len(found) == 1:
            out.append((f"What colour is the {shape}?", f"The {shape} is {found[0].colour}."))
    for colour in COLOURS:
        found = [t for t in scene if t.colour == colour]
        out.append(
            (
                f"How many {colour} shapes are there?",
                f"There {'is' if len(found) == 1 else 'are'} {_plural(len(found), colour + ' shape')}.",
            )
        )
        if len(found) == 1:
            out.append((f"Which shape is {colour}?", f"The {colour} shape is a {found[0].shape}."))
    for thing in scene:
        if sum(t.shape == thing.shape and t.colour == thing.colour for t in scene) == 1:
            out.append((f"Where is the {thing.colour} {thing.shape}?", f"It is in the {thing.cell}."))
    for cell in CELLS:
        here = [t for t in scene if t.cell == cell]
        out.append((f"What is in the {cell}?", f"A {here[0].colour} {here[0].shape}." if here else "Nothing."))
    return out


def yes_no(scene: tuple[Thing, ...], rng: random.Random) -> tuple[str, str]:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    if rng.random() < 0.5 and scene:  # ask about something that is there half of the time
        thing = rng.choice(scene)
        shape, colour = thing.shape, thing.colour
    present = any(t.shape == shape and t.colour == colour for t in scene)
    return f"Is there a {colour} {shape}?", "Yes." if present else "No."


def text_example(rng: random.Random) -> Example:
    if rng.random() < 0.1:
        return Example("Hello!", "Hello! Show me a picture and ask about its shapes.")
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return Example(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")


def sample(rng: random.Random, text_share: float = 0.15) -> Example:
    """One example: a picture question, or (with `text_share`) a text-only one."""
    if rng.random() < text_share:
        return text_example(rng)
    scene = random_scene(rng)
    question, answer = yes_no(scene, rng) if rng.random() < 0.15 else rng.choice(scene_questions(scene))
    return Example(question, answer, draw(scene, rng))


def examples(seed: int, count: int, text_share: float = 0.15) -> list[Example]:
    rng = random.Random(seed)
    return [sample(rng, text_share) for _ in range(count)]


def picture_question(scene: tuple[Thing, ...], rng: random.Random, asked: set[str] = frozenset()) -> tuple[str, str]:
    """A question about the scene (yes/no some of the time), not one of `asked` when others remain."""
    if rng.random() < 0.15:
        return yes_no(scene, rng)
    fresh = [qa for qa in scene_questions(scene) if qa[0] not in asked]
    return rng.choice(fresh or scene_questions(scene))


def conversation(rng: random.Random, turns: int | None = None) -> list[Turn]:
    """A chat of 2–4 turns: a picture and follow-ups about it (not sent again), text questions in
    between, sometimes a new picture mid-chat (later picture questions are about the newest one),
    sometimes a text question before any picture."""
    turns = turns if turns is not None else rng.randint(2, 4)
    out: list[Turn] = []
    scene: tuple[Thing, ...] | None = None
    asked: set[str] = set()
    for index in range(turns):
        kind = rng.random()
        if (scene is None and (index > 0 or kind > 0.2)) or (scene is not None and kind < 0.25):
            scene, asked = random_scene(rng), set()  # a (new) picture with this question
            question, answer = picture_question(scene, rng)
            out.append(Turn(question, answer, draw(scene, rng)))
        elif scene is None or kind < 0.45:
            example = text_example(rng)
            out.append(Turn(example.question, example.answer))
        else:  # a follow-up about the picture already in the chat
            question, answer = picture_question(scene, rng, asked)
            out.append(Turn(question, answer))
        asked.add(out[-1].question)
    return out


def conversations(seed: int, count: int) -> list[list[Turn]]:
    rng = random.Random(seed)
    return [conversation(rng) for _ in range(count)]
