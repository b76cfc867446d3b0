"""Calibration rows: deterministic, image conversations expanded exactly as at run time, every
local format readable through `datasets`, and clear errors for missing or short sources."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibration.render import bar_chart, document, rendered_samples, table
from calibration.rows import CalibrationSpec, build_rows, fit_image
from calibration.sources import CalibrationError, read_image_samples, read_texts, standard_text_files
from pixtral.image import patch_grid
from pixtral.tokenizer import PixtralTokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> PixtralTokenizer:
    return PixtralTokenizer(tiny_model)


def test_default_text_is_exllamav2s_standard_set_without_importing_it() -> None:
    import sys

    files = standard_text_files()
    assert {"wiki", "c4", "code", "tiny", "multilingual", "technical"} <= set(files)
    assert "exllamav2" not in sys.modules  # located, never imported (it needs CUDA)


def test_rows_are_deterministic_and_mixed(tokenizer: PixtralTokenizer) -> None:
    spec = CalibrationSpec(rows=10, measure_rows=4, length=200, image_fraction=0.3, random_rows=1)
    rows = build_rows(spec, tokenizer)
    again = build_rows(spec, tokenizer)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(rows, again))
    assert all(len(r.input_ids) == 200 and r.input_ids[0] == tokenizer.bos_id for r in rows)
    kinds = [r.kind for r in rows]
    assert kinds.count("image") == 3 and kinds.count("random") == 1
    assert "image" in kinds[:4] and "text" in kinds[:4]  # the measurement rows see both
    other_seed = build_rows(CalibrationSpec(rows=10, measure_rows=4, length=200, image_fraction=0.3, seed=1), tokenizer)
    assert not torch.equal(rows[1].input_ids, other_seed[1].input_ids)


def test_image_rows_hold_whole_grids_in_chat_format(tokenizer: PixtralTokenizer) -> None:
    rows = build_rows(CalibrationSpec(rows=4, measure_rows=2, length=300, image_fraction=0.5), tokenizer)
    ids = tokenizer.image_ids
    for row in (r for r in rows if r.kind == "image"):
        tokens = row.input_ids.tolist()
        assert tokens.count(ids.img_end) == len(row.images)
        assert tokens.count(ids.img) == sum(p.shape[1] * p.shape[2] // 256 for p in row.images)
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        assert text.startswith("<s>[INST][IMG]") and "[/INST]" in text
        assert all(p.dtype == np.float32 and p.shape[0] == 3 for p in row.images)


def test_text_only_has_no_images(tokenizer: PixtralTokenizer) -> None:
    rows = build_rows(CalibrationSpec(rows=5, measure_rows=2, length=64, image_fraction=0.0), tokenizer)
    assert all(not r.images for r in rows)


def test_fit_image_respects_token_budget() -> None:
    image = Image.new("RGB", (1600, 900))
    for budget in (40, 300, 1200):
        rows, cols = patch_grid(*fit_image(image, budget).size)
        assert rows * (cols + 1) <= budget


def test_rendered_pictures_are_deterministic_and_answerable() -> None:
    a, b = (
        rendered_samples(6, seed=3, texts=["alpha beta gamma delta " * 30]),
        rendered_samples(6, seed=3, texts=["alpha beta gamma delta " * 30]),
    )
    assert [s.answer for s in a] == [s.answer for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    chart = bar_chart(random.Random(0))
    assert chart.question.endswith("'.") and any(ch.isdigit() for ch in chart.answer)
    assert "table" in table(random.Random(0)).question
    assert document(random.Random(0), "one two three four five six").answer


def test_local_text_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("First document.\n\n\n\nSecond document.")
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"record {i}", "id": i}) for i in range(3)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": ["a1", "a2"]}), tmp_path / "c.parquet")
    assert read_texts(tmp_path / "a.txt") == ["First document.", "Second document."]
    assert read_texts(tmp_path / "b.jsonl") == ["record 0", "record 1", "record 2"]
    assert read_texts(tmp_path / "c.parquet") == ["q1 a1", "q2 a2"]
    assert len(read_texts(tmp_path)) == 7  # a folder: every file in it


def test_local_image_formats(tmp_path: Path) -> None:
    folder = tmp_path / "pics"
    folder.mkdir()
    Image.new("RGB", (40, 30), "red").save(folder / "red.png")
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "red.png", "question": "Color?", "answer": "Red."}) + "\n"
    )
    samples = read_image_samples(folder)
    assert len(samples) == 1 and samples[0].answer == "Red." and samples[0].image.size == (40, 30)
    listing = tmp_path / "pairs.jsonl"
    listing.write_text(json.dumps({"image": "pics/red.png", "text": "A red square."}) + "\n")
    (sample,) = read_image_samples(listing)
    assert sample.answer == "A red square." and sample.question == "Describe this image."


def test_missing_and_bad_sources(tmp_path: Path, tokenizer: PixtralTokenizer) -> None:
    with pytest.raises(CalibrationError, match="nothing.txt: calibration text not found"):
        read_texts(tmp_path / "nothing.txt")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(CalibrationError, match="unsupported calibration text format"):
        read_texts(tmp_path / "data.csv")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "gone.png"}) + "\n")
    with pytest.raises(CalibrationError, match="gone.png"):
        read_image_samples(tmp_path / "pairs.jsonl")
    with pytest.raises(CalibrationError, match="measure_rows"):
        build_rows(CalibrationSpec(rows=2, measure_rows=3, length=64), tokenizer)
