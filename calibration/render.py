"""Charts, tables and document pages drawn for calibration, each with a question it can answer.

Pixtral's headline tasks are ChartQA and DocVQA, so calibration shows the decoder image features of
text-heavy pictures, not only photos. Everything is drawn with PIL from a seeded RNG: the same seed
gives the same pixels, questions and answers, and the answers are right because we drew the data.
"""

from __future__ import annotations

import random
import textwrap
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

CATEGORY_SETS = (
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun"),
    ("Apples", "Pears", "Plums", "Cherries", "Grapes"),
    ("France", "Spain", "Italy", "Poland", "Norway", "Greece"),
    ("Q1", "Q2", "Q3", "Q4"),
    ("Alpha", "Beta", "Gamma", "Delta", "Epsilon"),
)
COLORS = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1")
TABLE_NAMES = ("Ana", "Bo", "Chen", "Dara", "Emil", "Femi", "Goran", "Hana")


@dataclass(frozen=True)
class ImageSample:
    """One picture with a question and its answer, in Pixtral's chat format once rendered."""

    image: Image.Image
    question: str
    answer: str
    source: str


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def bar_chart(rng: random.Random) -> ImageSample:
    labels = rng.choice(CATEGORY_SETS)
    values = [rng.randint(5, 95) for _ in labels]
    width, height, margin = 520, 360, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title = rng.choice(("Sales by category", "Survey results", "Monthly totals", "Units shipped"))
    draw.text((margin, 12), title, fill="black", font=_font(20))
    draw.line((margin, height - margin, width - 20, height - margin), fill="black", width=2)
    slot = (width - margin - 30) / len(labels)
    for i, (label, value) in enumerate(zip(labels, values)):
        x0 = margin + i * slot + slot * 0.15
        top = height - margin - value * (height - 2 * margin - 20) / 100
        draw.rectangle((x0, top, x0 + slot * 0.7, height - margin), fill=COLORS[i % len(COLORS)])
        draw.text((x0, top - 18), str(value), fill="black", font=_font(14))
        draw.text((x0, height - margin + 6), label, fill="black", font=_font(14))
    best = max(range(len(values)), key=values.__getitem__)
    a, b = rng.sample(range(len(labels)), 2)
    question, answer = rng.choice(
        (
            ("Which category has the highest value?", f"{labels[best]}, with {values[best]}."),
            (f"What is the value for {labels[a]}?", f"The bar for {labels[a]} shows {values[a]}."),
            (
                f"How much larger is {labels[a]} than {labels[b]}?",
                f"{labels[a]} is {values[a]} and {labels[b]} is {values[b]}, a difference of {values[a] - values[b]}.",
            ),
        )
    )
    return ImageSample(image, f"{question} The chart is titled '{title}'.", answer, "rendered:bar_chart")


def line_chart(rng: random.Random) -> ImageSample:
    labels = rng.choice(CATEGORY_SETS)
    values = [rng.randint(10, 90)]
    for _ in labels[1:]:
        values.append(max(0, min(100, values[-1] + rng.randint(-25, 25))))
    width, height, margin = 480, 320, 45
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 10), "Trend over time", fill="black", font=_font(18))
    step = (width - 2 * margin) / max(1, len(labels) - 1)
    points = [(margin + i * step, height - margin - v * (height - 2 * margin) / 100) for i, v in enumerate(values)]
    draw.line(points, fill=rng.choice(COLORS), width=3)
    for (x, y), label, value in zip(points, labels, values):
        draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill="black")
        draw.text((x - 10, y - 22), str(value), fill="black", font=_font(13))
        draw.text((x - 10, height - margin + 8), label, fill="black", font=_font(13))
    rising = values[-1] > values[0]
    answer = (
        f"It goes from {values[0]} at {labels[0]} to {values[-1]} at {labels[-1]}, so overall it "
        f"{'rises' if rising else 'falls'}."
    )
    return ImageSample(
        image, "Does the line go up or down overall? Give the first and last values.", answer, "rendered:line_chart"
    )


def table(rng: random.Random) -> ImageSample:
    names = rng.sample(TABLE_NAMES, 5)
    columns = ("Name", "Age", "Score", "City")
    cities = ("Oslo", "Lyon", "Turin", "Porto", "Graz", "Gdansk")
    rows = [(n, str(rng.randint(19, 70)), str(rng.randint(40, 100)), rng.choice(cities)) for n in names]
    cell_w, cell_h = 110, 34
    image = Image.new("RGB", (cell_w * len(columns) + 20, cell_h * (len(rows) + 1) + 20), "white")
    draw = ImageDraw.Draw(image)
    for r, row in enumerate([columns, *rows]):
        for c, value in enumerate(row):
            x, y = 10 + c * cell_w, 10 + r * cell_h
            draw.rectangle((x, y, x + cell_w, y + cell_h), outline="black", fill="#dddddd" if r == 0 else "white")
            draw.text((x + 8, y + 8), value, fill="black", font=_font(16))
    pick = rng.randrange(len(rows))
    column = rng.randrange(1, len(columns))
    question = f"In the table, what is the {columns[column]} of {rows[pick][0]}?"
    return ImageSample(
        image, question, f"The {columns[column]} of {rows[pick][0]} is {rows[pick][column]}.", "rendered:table"
    )


def document(rng: random.Random, text: str) -> ImageSample:
    words = text.split()
    start = rng.randrange(max(1, len(words) - 80))
    body = " ".join(words[start : start + 80]) or "Empty page."
    title = " ".join(words[start : start + 4]).strip(".,;:").title() or "Untitled"
    image = Image.new("RGB", (440, 560), "#fbfbf6")
    draw = ImageDraw.Draw(image)
    draw.text((30, 24), title, fill="black", font=_font(22))
    y = 70
    for line in textwrap.wrap(body, width=44):
        draw.text((30, y), line, fill="#222222", font=_font(15))
        y += 22
    first = textwrap.wrap(body, width=44)[0]
    question, answer = rng.choice(
        (
            ("What is the title of this page?", f"The title is '{title}'."),
            ("Read the first line of the body text.", first),
        )
    )
    return ImageSample(image, question, answer, "rendered:document")


def rendered_samples(count: int, seed: int, texts: list[str]) -> list[ImageSample]:
    """`count` drawn samples cycling through bar charts, tables, documents and line charts."""
    rng = random.Random(seed)
    makers = (bar_chart, table, lambda r: document(r, r.choice(texts) if texts else ""), line_chart)
    return [makers[i % len(makers)](rng) for i in range(count)]
