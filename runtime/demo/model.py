"""The embedded demo model: a small Pixtral trained on the shapes task, shipped with the package.

Real architecture at toy size (decoder 4 × 128 wide, vision tower 2 × 128 wide, Large's v7m1
tokenizer with its 32768 tokens, so the whole model is ~9.6M parameters, 19 MB in fp16). The weights
come from `python -m runtime.demo.train` (seed, steps and time in weights/demo-pixtral.json).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from safetensors.torch import load_file

from calibration.demo_task import NUMBERS, draw, random_scene, scene_questions
from convert.hf_files import bundled_tokenizer_path, write_model_files
from pixtral.errors import UserError
from pixtral.outputs import atomic_directory, write_json
from pixtral.weights import ShardWriter
from runtime.demo.spec import SyntheticSpec

WEIGHTS_FILE = Path(__file__).parent / "weights" / "demo-pixtral.safetensors"
EXAMPLES_SEED = 4  # the pictures `demo-model` writes: a stream training, calibration and eval never use
TASK_FILE = "demo-task.json"  # marks a directory (and the tiers copied from it) as the demo model

DEMO_SPEC = SyntheticSpec(
    hidden_size=128,
    intermediate_size=384,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    vision_hidden_size=128,
    vision_intermediate_size=256,
    vision_layers=2,
    vision_heads=4,
    projector_bias=False,
    tokenizer="spm",
    seed=2411,
)


def write_demo_model(out_dir: str | Path, force: bool = False) -> Path:
    """Write the trained demo model as an HF Llava directory (fp16, one shard)."""
    if not WEIGHTS_FILE.is_file():
        raise UserError(
            f"{WEIGHTS_FILE}: the trained demo weights are missing; train them with `python -m runtime.demo.train`"
        )
    cfg = DEMO_SPEC.config()
    with atomic_directory(out_dir, force, "demo-model") as tmp:
        write_model_files(tmp, cfg, bundled_tokenizer_path(DEMO_SPEC.tokenizer), "float16")
        writer = ShardWriter(tmp, "model", 2**31)
        for name, tensor in load_file(str(WEIGHTS_FILE)).items():
            writer.add(name, tensor)
        writer.finish()
        write_json(tmp / TASK_FILE, {"task": "pixtral-exl2 shapes demo (calibration/demo_task.py)", "version": 1})
        write_examples(tmp / "examples")
    return Path(out_dir)


def write_examples(folder: Path, count: int = 8) -> None:
    """Pictures to try the model on, their questions with answers, and a multiple-choice file for
    `pixtral-exl2 eval --choices` (scenes from a seed stream training never saw)."""
    rng = random.Random(EXAMPLES_SEED)
    folder.mkdir()
    questions, choices = [], []
    for index in range(1, count + 1):
        scene = random_scene(rng)
        name = f"scene-{index}.png"
        draw(scene, rng).save(folder / name)
        asked = rng.sample(scene_questions(scene), 3)
        questions += [{"image": name, "question": q, "answer": a} for q, a in asked]
        count_question = next((qa for qa in scene_questions(scene) if qa[0].startswith("How many shapes")), asked[0])
        options = [f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'' if n == 1 else 's'}." for n in (1, 2, 3)]
        choices.append({"image": name, "question": count_question[0], "choices": options, "answer": count_question[1]})
    (folder / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    (folder / "choices.jsonl").write_text("".join(json.dumps(c) + "\n" for c in choices), encoding="utf-8")


def is_demo_model(model_dir: str | Path) -> bool:
    return (Path(model_dir) / TASK_FILE).is_file()
