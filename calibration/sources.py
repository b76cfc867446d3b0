"""Where calibration text and pictures come from: local files read with `datasets`, or the defaults.

Default text is the standard EXL2 calibration set that the exllamav2 wheel ships (wiki, c4, code,
TinyStories, multilingual, technical), located with `importlib.util.find_spec` so that exllamav2 is
never imported (it cannot be without CUDA). Default pictures are the public-domain/CC0 photos in
`calibration/data/images` plus charts, tables and pages drawn by `render.py`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import Image

from calibration.render import ImageSample, rendered_samples
from pixtral.errors import UserError
from pixtral.image import ImageError, open_image

DATA_DIR = Path(__file__).parent / "data"
TEXT_SUFFIXES = (".txt", ".utf8", ".md", ".text")
WIKI_DOC_END = "</doc>\n"
DEMO_TASK = "builtin:demo-task"  # the demo model's own task as a calibration source (text and images)
MAX_DOC_CHARS = 6000


class CalibrationError(UserError):
    """A calibration source that is missing, empty, or too short for the rows asked for."""


def standard_text_files() -> dict[str, Path]:
    """exllamav2's shipped calibration texts by name, without importing exllamav2."""
    spec = importlib.util.find_spec("exllamav2")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError("exllamav2 is not installed: its wheel ships the standard calibration text")
    folder = Path(spec.submodule_search_locations[0]) / "conversion" / "standard_cal_data"
    files = {p.stem: p for p in sorted(folder.glob("*.utf8"))}
    if not files:
        raise CalibrationError(f"{folder}: no *.utf8 calibration files found")
    return files


def split_documents(text: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Wikipedia dumps are split at </doc> (header line dropped); other text at blank-line runs of ≥3.
    Long documents are cut at line ends into pieces of at most `max_chars`, so rows mix sources."""
    if WIKI_DOC_END in text:
        docs = [d[d.find("\n") + 1 :] for d in text.split(WIKI_DOC_END)]
    else:
        docs = text.split("\n\n\n")
    pieces = []
    for doc in (d.strip() for d in docs):
        while len(doc) > max_chars:
            cut = doc.rfind("\n", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            pieces.append(doc[:cut].strip())
            doc = doc[cut:].strip()
        pieces.append(doc)
    return [p for p in pieces if p]


def _load(builder: str, path: Path, **kwargs: object) -> list[dict]:
    import datasets  # heavy import, only when a user file is read

    datasets.disable_progress_bars()
    try:
        if path.is_dir():
            dataset = datasets.load_dataset(builder, data_dir=str(path), split="train", **kwargs)
        else:
            dataset = datasets.load_dataset(builder, data_files=[str(path)], split="train", **kwargs)
        if builder == "imagefolder":  # paths only: we decode (with our size caps and clear errors)
            dataset = dataset.cast_column("image", datasets.Image(decode=False))
        return list(dataset)
    except Exception as err:  # datasets raises many kinds; all mean "cannot read this file"
        raise CalibrationError(f"{path}: cannot read as {builder} calibration data ({err})") from err


def read_texts(path: str | Path) -> list[str]:
    """Documents from a text file, a jsonl/json file (`text` column, else all string columns
    joined), a parquet file (all columns joined with a space, as exllamav2), or a folder of those;
    `builtin:demo-task`: conversations of the demo model's task."""
    if str(path) == DEMO_TASK:
        return demo_task_texts()
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"{path}: calibration text not found")
    if path.is_dir():
        docs = [d for child in sorted(path.iterdir()) if child.is_file() for d in read_texts(child)]
    elif path.suffix in TEXT_SUFFIXES:
        docs = split_documents(path.read_text(encoding="utf-8", errors="replace"))
    elif path.suffix in (".jsonl", ".json"):
        docs = [_record_text(record) for record in _load("json", path)]
    elif path.suffix == ".parquet":
        docs = [" ".join(str(v) for v in record.values()) for record in _load("parquet", path)]
    else:
        raise CalibrationError(f"{path}: unsupported calibration text format (use .txt, .jsonl, .json or .parquet)")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CalibrationError(f"{path}: no calibration text in it")
    return docs


def _record_text(record: dict) -> str:
    if isinstance(record.get("text"), str):
        return record["text"]
    return "\n\n".join(v for v in record.values() if isinstance(v, str))


def read_image_samples(path: str | Path) -> list[ImageSample]:
    """Pictures with a question and answer (or a caption) from an image folder (metadata.jsonl with
    `file_name`, `question`/`answer` or `text`) or from a jsonl file of {image, question, answer};
    `builtin:demo-task`: drawn scenes of the demo model's task."""
    if str(path) == DEMO_TASK:
        return demo_task_samples()
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"{path}: calibration images not found")
    if path.is_dir():
        records = _load("imagefolder", path)
        samples = [
            _sample(_open(r["image"]["path"] or r["image"]["bytes"], f"{path}: image {i}: "), r, f"{path}:{i}")
            for i, r in enumerate(records)
        ]
    elif path.suffix == ".jsonl":
        samples = []
        for i, record in enumerate(_load("json", path)):
            image_path = path.parent / str(record.get("image", ""))
            if not image_path.is_file():
                raise CalibrationError(f"{path}: row {i} names image {record.get('image')!r}, which does not exist")
            samples.append(_sample(_open(image_path, f"{path}: row {i}: "), record, str(image_path)))
    else:
        raise CalibrationError(f"{path}: calibration images must be a folder or a .jsonl file")
    if not samples:
        raise CalibrationError(f"{path}: no calibration images in it")
    return samples


def _open(source: str | Path | bytes, where: str) -> Image.Image:
    """Decode a calibration picture; a path names itself in errors, bytes get `where`."""
    try:
        return open_image(source)
    except ImageError as err:
        raise CalibrationError(f"calibration image {'' if isinstance(source, (str, Path)) else where}{err}") from err


def _sample(image: Image.Image, record: dict, source: str) -> ImageSample:
    question = record.get("question") or "Describe this image."
    answer = record.get("answer") or record.get("text") or record.get("caption") or ""
    return ImageSample(image.convert("RGB"), str(question), str(answer), source)


def demo_task_texts(count: int = 400) -> list[str]:
    """Whole conversations of the demo task (its text questions and the words of its picture
    questions), as the demo model's chat template writes them."""
    from calibration.demo_task import CALIBRATION_SEED, examples
    from pixtral.chat_template import chat_template, render_chat

    template = chat_template("spm")  # the demo model's tokenizer (v7m1)
    docs = []
    for example in examples(CALIBRATION_SEED, count, text_share=0.5):
        messages = [{"role": "user", "content": example.question}, {"role": "assistant", "content": example.answer}]
        docs.append(render_chat(template, messages).removeprefix("<s>"))
    return docs


def demo_task_samples(count: int = 64) -> list[ImageSample]:
    """Drawn scenes of the demo task with a question each (a seed stream training never saw)."""
    from calibration.demo_task import CALIBRATION_SEED, examples

    pictures = [e for e in examples(CALIBRATION_SEED + 100, 2 * count, text_share=0.0) if e.image is not None][:count]
    return [ImageSample(e.image, e.question, e.answer, DEMO_TASK) for e in pictures]


def default_image_samples(seed: int, texts: list[str]) -> list[ImageSample]:
    """The shipped photos plus as many drawn charts, tables and pages."""
    photos = read_image_samples(DATA_DIR / "images")
    return photos + rendered_samples(max(8, len(photos)), seed, texts)
