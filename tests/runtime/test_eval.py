"""`pixtral-exl2 eval` on the demo model and its tiers, and the model cards quantize and eval write."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from runtime.cli import app
from runtime.demo.model import write_demo_model
from runtime.outputs import MARKER

runner = CliRunner()
TIERS = "2.5,4.0,8.0"
SE_MARGIN = 2.0  # two accuracies are "ordered" only beyond two standard errors of their difference


def not_worse_beyond_noise(better: float, worse: float, n: int) -> bool:
    """`better` is not below `worse` by more than SE_MARGIN standard errors of the difference of two
    accuracies on the same n questions (binomial, unpaired: the conservative bound)."""
    se = math.sqrt((better * (1 - better) + worse * (1 - worse)) / n)
    return better >= worse - SE_MARGIN * max(se, 1 / n)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    demo = write_demo_model(root / "demo")
    result = runner.invoke(app, ["quantize", str(demo), str(root / "exl2"), "--recipe", "demo", "--bpw", TIERS])
    assert result.exit_code == 0, result.output
    return demo, root / "exl2"


def test_quantize_writes_a_card_per_tier(quantized: tuple[Path, Path]) -> None:
    _, out = quantized
    card = (out / "4.0bpw" / "README.md").read_text()
    assert "EXL2 4.0 bpw" in card and "decoder bits per weight | 4.0" in card and "calibration-set KL" in card
    assert "pixtral-exl2 eval" in card  # not measured yet: says how to measure
    assert "README.md" in json.loads((out / "4.0bpw" / MARKER).read_text())["files"]


def test_eval_measures_every_tier_and_refreshes_the_cards(quantized: tuple[Path, Path], tmp_path: Path) -> None:
    demo, out = quantized
    report = tmp_path / "report.json"
    result = runner.invoke(app, ["eval", str(demo), str(out), "--json", str(report), "--samples", "128",
                                 "--choices", str(demo / "examples" / "choices.jsonl")])  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    models, n_task = data["models"], data["sets"]["task questions"]
    assert [m["name"] for m in models] == ["fp16", "2.5bpw", "4.0bpw", "8.0bpw"]
    fp16, low, mid, high = models
    assert fp16["task_accuracy"] >= 0.9 and fp16["image_kl"] == pytest.approx(0, abs=1e-6) and fp16["image_top1"] == 1.0
    assert high["image_kl"] < mid["image_kl"] < low["image_kl"]  # quality improves with bpw
    assert high["text_kl"] < low["text_kl"]
    assert not_worse_beyond_noise(high["task_accuracy"], fp16["task_accuracy"], n_task)
    assert not_worse_beyond_noise(high["task_accuracy"], low["task_accuracy"], n_task)
    assert all(m["choice_accuracy"] is not None for m in models)
    assert (out / "quality.png").stat().st_size > 10_000
    card = (out / "4.0bpw" / "README.md").read_text()
    assert "| **4.0bpw** |" in card and "![quality against bpw](quality.png)" in card and (out / "4.0bpw" / "quality.png").is_file()
    assert "quality.png" in json.loads((out / "4.0bpw" / MARKER).read_text())["files"]


def test_eval_leaves_an_edited_card_alone_without_force(quantized: tuple[Path, Path]) -> None:
    demo, out = quantized
    card = out / "8.0bpw" / "README.md"
    card.write_text("my own notes")
    result = runner.invoke(app, ["eval", str(demo), str(out / "8.0bpw"), "--samples", "16"])
    assert result.exit_code == 0 and "card not refreshed" in result.output
    assert card.read_text() == "my own notes"
    assert runner.invoke(app, ["eval", str(demo), str(out / "8.0bpw"), "--samples", "16", "--force"]).exit_code == 0
    assert "| **8.0bpw** |" in card.read_text()


def test_eval_refuses_what_is_not_a_tier(quantized: tuple[Path, Path], tmp_path: Path) -> None:
    demo, out = quantized
    result = runner.invoke(app, ["eval", str(demo), str(tmp_path)])
    assert result.exit_code == 2 and "not a model directory" in result.output
    result = runner.invoke(app, ["eval", str(demo), str(demo)])
    assert result.exit_code == 2 and "is the source itself" in result.output
    result = runner.invoke(app, ["eval", str(out / "4.0bpw"), str(out / "2.5bpw")])
    assert result.exit_code == 2 and "is an EXL2 checkpoint" in result.output


def test_a_chat_on_a_tier_answers_about_a_drawn_picture(quantized: tuple[Path, Path]) -> None:
    """As README says: `pixtral-exl2 chat demo-exl2/4.0bpw`, a picture, a question, the right answer."""
    demo, out = quantized
    questions = [json.loads(line) for line in (demo / "examples" / "questions.jsonl").read_text().splitlines()]
    script = [line for q in questions for line in ("/reset", f"/image {demo / 'examples' / q['image']}", q["question"])]
    result = runner.invoke(app, ["chat", str(out / "4.0bpw"), "--backend", "reference", "--temperature", "0", "--max-tokens", "16"],
                           input="\n".join(script) + "\n")  # fmt: skip
    assert result.exit_code == 0, result.output
    replies = [line.removeprefix("model>").strip() for line in result.output.splitlines() if line.startswith("model>")]
    assert len(replies) == len(questions)
    right = sum(reply == q["answer"] for reply, q in zip(replies, questions))
    assert right >= 0.75 * len(questions), list(zip(replies, (q["answer"] for q in questions)))


def test_eval_measures_bpw_from_the_tensors_not_the_config(quantized: tuple[Path, Path], tmp_path: Path) -> None:
    """A config's numbers are claims (exllamav2's convert writes 4.0 / head 6 for 3.9975 / 8.03 bpw)."""
    import shutil

    from runtime.exl2_checkpoint import EXL2Checkpoint

    demo, out = quantized
    tier = tmp_path / "4.0bpw"
    shutil.copytree(out / "4.0bpw", tier)
    config = json.loads((tier / "config.json").read_text())
    config["quantization_config"].update(bits=5.0, decoder_bpw=5.0, head_bits=8, head_bpw=8.0)
    (tier / "config.json").write_text(json.dumps(config))
    report = tmp_path / "report.json"
    assert runner.invoke(app, ["eval", str(demo), str(tier), "--samples", "16", "--json", str(report), "--no-card"]).exit_code == 0
    scored = json.loads(report.read_text())["models"][1]
    with EXL2Checkpoint(tier) as ckpt:
        assert scored["bpw"] == pytest.approx(ckpt.decoder_bpw()) and scored["head_bpw"] == pytest.approx(ckpt.head_bpw())
    assert scored["bpw"] == pytest.approx(4.0, abs=0.01) and scored["head_bpw"] < 7
