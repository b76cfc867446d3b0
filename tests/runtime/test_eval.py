"""`pixtral-exl2 eval` on the demo model and its tiers, and the model cards quantize and eval write."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli import app
from pixtral.outputs import MARKER
from runtime.demo.model import write_demo_model

runner = CliRunner()
README = Path(__file__).parents[2] / "README.md"
TIERS = ("2.5bpw", "4.0bpw", "8.0bpw")  # the tiers most tests score (the fixture writes the demo recipe's seven)
README_THREADS = 2  # README's table: "two CPU cores"; the numbers depend on torch's thread count
SE_MARGIN = 2.0  # two accuracies are "ordered" only beyond two standard errors of their difference


def not_worse_beyond_noise(better: float, worse: float, n: int) -> bool:
    """`better` is not below `worse` by more than SE_MARGIN standard errors of the difference of two
    accuracies on the same n questions (binomial, unpaired: the conservative bound)."""
    se = math.sqrt((better * (1 - better) + worse * (1 - worse)) / n)
    return better >= worse - SE_MARGIN * max(se, 1 / n)


@pytest.fixture
def readme_threads() -> Iterator[None]:
    """Commands run with --threads README_THREADS set torch's threads for the process: put them back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """README's main job: the demo model and `quantize demo demo-exl2 --recipe demo` (on README's threads)."""
    root = tmp_path_factory.mktemp("eval")
    demo = write_demo_model(root / "demo")
    before = torch.get_num_threads()
    result = runner.invoke(
        app, ["quantize", str(demo), str(root / "exl2"), "--recipe", "demo", "--threads", str(README_THREADS)]
    )
    torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    yield demo, root / "exl2"


def _table_rows(text: str) -> list[list[str]]:
    """The rows of eval's printed table (a line per model: name, then numbers), whitespace-split."""
    return [line.split() for line in text.splitlines() if re.match(r"\s*(fp16|\d\.\dbpw)\s", line)]


def test_readme_table_is_what_the_main_job_prints(quantized: tuple[Path, Path], readme_threads: None) -> None:
    """README's first command ends with `pixtral-exl2 eval demo demo-exl2`: its table is in README.
    The numbers are exact for a thread count and the float kernels of a machine kind: where even the
    fp16 row (no quantization in it) differs, this machine's kernels differ and only the tiers' names
    and bpw are compared."""
    demo, out = quantized
    result = runner.invoke(app, ["eval", str(demo), str(out), "--threads", str(README_THREADS), "--no-card"])
    assert result.exit_code == 0, result.output
    printed = _table_rows(result.output)
    block = re.search(r"The first command ends with this table.*?```text\n(.+?)```", README.read_text(), flags=re.S)
    assert block, "README has no printed eval table"
    shown = _table_rows(block.group(1))
    assert [row[:2] for row in shown] == [row[:2] for row in printed]
    if shown[0] != printed[0]:
        pytest.skip(f"this machine's float kernels differ from README's (fp16 row {printed[0]} vs {shown[0]})")
    assert shown == printed, "README's table is not what `pixtral-exl2 eval demo demo-exl2` prints: paste the new one"


def test_quantize_writes_a_card_per_tier(quantized: tuple[Path, Path]) -> None:
    _, out = quantized
    card = (out / "4.0bpw" / "README.md").read_text()
    assert "EXL2 4.0 bpw" in card and "decoder bits per weight | 4.0" in card and "calibration-set KL" in card
    assert "pixtral-exl2 eval" in card  # not measured yet: says how to measure
    assert "README.md" in json.loads((out / "4.0bpw" / MARKER).read_text())["files"]


def test_eval_measures_every_tier_and_refreshes_the_cards(quantized: tuple[Path, Path], tmp_path: Path) -> None:
    demo, out = quantized
    report = tmp_path / "report.json"
    result = runner.invoke(
        app,
        [
            "eval",
            str(demo),
            *(str(out / t) for t in TIERS),
            "--json",
            str(report),
            "--samples",
            "128",
            "--choices",
            str(demo / "examples" / "choices.jsonl"),
        ],
    )
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
    assert (
        "| **4.0bpw** |" in card
        and "![quality against bpw](quality.png)" in card
        and (out / "4.0bpw" / "quality.png").is_file()
    )
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
    result = runner.invoke(
        app,
        ["chat", str(out / "4.0bpw"), "--backend", "reference", "--temperature", "0", "--max-tokens", "16"],
        input="\n".join(script) + "\n",
    )
    assert result.exit_code == 0, result.output
    replies = [line.removeprefix("model>").strip() for line in result.output.splitlines() if line.startswith("model>")]
    assert len(replies) == len(questions)
    right = sum(reply == q["answer"] for reply, q in zip(replies, questions))
    assert right >= 0.75 * len(questions), list(zip(replies, (q["answer"] for q in questions)))


def test_eval_measures_bpw_from_the_tensors_not_the_config(quantized: tuple[Path, Path], tmp_path: Path) -> None:
    """A config's numbers are claims (exllamav2's convert writes 4.0 / head 6 for 3.9975 / 8.03 bpw)."""
    import shutil

    from pixtral.exl2.checkpoint import EXL2Checkpoint

    demo, out = quantized
    tier = tmp_path / "4.0bpw"
    shutil.copytree(out / "4.0bpw", tier)
    config = json.loads((tier / "config.json").read_text())
    config["quantization_config"].update(bits=5.0, decoder_bpw=5.0, head_bits=8, head_bpw=8.0)
    (tier / "config.json").write_text(json.dumps(config))
    report = tmp_path / "report.json"
    assert (
        runner.invoke(
            app, ["eval", str(demo), str(tier), "--samples", "16", "--json", str(report), "--no-card"]
        ).exit_code
        == 0
    )
    scored = json.loads(report.read_text())["models"][1]
    with EXL2Checkpoint(tier) as ckpt:
        assert scored["bpw"] == pytest.approx(ckpt.decoder_bpw()) and scored["head_bpw"] == pytest.approx(
            ckpt.head_bpw()
        )
    assert scored["bpw"] == pytest.approx(4.0, abs=0.01) and scored["head_bpw"] < 7


def test_the_plot_gives_each_quantity_its_own_axis() -> None:
    from runtime.eval.plot import quality_figure
    from runtime.eval.run import ModelScore

    fp16 = ModelScore("fp16", "demo", None, None, 100, 140.0, 0.0, 0.0, 1.0, 0.96)
    tiers = [
        ModelScore(f"{b}bpw", "t", b, 6.5, 50, 150.0, kl, kl, 1 - kl, 0.95)
        for b, kl in ((2.5, 0.2), (4.0, 0.03), (8.0, 0.001))
    ]
    axes = quality_figure([fp16, *tiers], "demo").axes
    assert [a.get_title() for a in axes] == [
        "task accuracy",
        "top-1 agreement with fp16",
        "divergence from fp16 (0 = fp16)",
    ]
    assert len({a.get_ylabel() for a in axes}) == 3  # accuracy and agreement are not one scale
    assert [len(a.get_lines()) for a in axes] == [2, 1, 2]  # tier + fp16 line; agreement; text and image KL
    general = [
        ModelScore(s.name, s.path, s.bpw, s.head_bpw, s.size_bytes, s.text_ppl, s.text_kl, s.image_kl, s.image_top1)
        for s in [fp16, *tiers]
    ]
    assert [a.get_title() for a in quality_figure(general, "12B").axes][
        0
    ] == "top-1 agreement with fp16"  # no task: no accuracy panel
