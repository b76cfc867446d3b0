"""eval's part of each tier's model card: the measured Quality section (table and plot); the rest of
the card is quantize's (quantize/card.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from pixtral.config import load_config
from pixtral.exl2.metadata import EXL2Metadata
from pixtral.outputs import OutputError, update_owned_files
from quantize.card import number, render_card, size_text
from runtime.eval.run import ModelScore

PLOT_FILE = "quality.png"


def quality_table(scores: list[ModelScore], highlight: str | None = None) -> str:
    rows = [
        "| model | decoder bpw | size | task accuracy | image KL | image top-1 | text KL | text PPL | MC accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in scores:
        name = f"**{s.name}**" if s.name == highlight else s.name
        rows.append(
            f"| {name} | {number(s.bpw, 3) if s.bpw else '16 (fp16)'} | {size_text(s.size_bytes)} | "
            f"{number(s.task_accuracy, 3)} | "
            f"{number(s.image_kl)} | {number(s.image_top1, 3)} | {number(s.text_kl)} | {number(s.text_ppl, 3)} | "
            f"{number(s.choice_accuracy, 3)} |"
        )
    return "\n".join(rows)


def quality_section(tier: str, scores: list[ModelScore], eval_notes: dict[str, Any] | None) -> list[str]:
    """The card's Quality section: every tier's measured row, `tier` in bold, and the plot."""
    return [
        f"Measured with `pixtral-exl2 eval` against the fp16 source ({_notes(eval_notes)}). Lower KL is closer to "
        "fp16.",
        "",
        quality_table(scores, tier),
        "",
        f"![quality against bpw]({PLOT_FILE})",
        "",
    ]


def _notes(notes: dict[str, Any] | None) -> str:
    if not notes:
        return "default sets"
    return ", ".join(f"{v} {k}" for k, v in notes.items() if v)


def refresh_cards(
    source_name: str, tiers: list[Path], scores: list[ModelScore], sets: dict[str, int], plot: bytes, force: bool
) -> list[str]:
    """Rewrite each tier's README.md and quality.png with the measured table; returns the tiers whose
    card was left alone (edited by someone since we wrote it, unless `force`)."""
    refused = []
    for score, tier in zip(scores[1:], tiers):
        quant = load_config(tier).quantization or EXL2Metadata()
        quant = replace(quant, source_model=quant.source_model or source_name)
        card = render_card(tier.name, quant, score.size_bytes, quality_section(tier.name, scores, sets))
        try:
            update_owned_files(tier, {"README.md": card.encode("utf-8"), PLOT_FILE: plot}, force)
        except OutputError as err:
            refused.append(str(err))
    return refused
