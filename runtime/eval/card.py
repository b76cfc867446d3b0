"""The README.md model card of an EXL2 tier, in the style of Hugging Face EXL2 cards, with numbers.

`quantize` writes it with what it knows (bpw, size, head bits, calibration, the calibration-set KL);
`eval` rewrites it with the measured quality table and plot of every tier evaluated.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import load_config
from ..exl2_metadata import EXL2Metadata
from ..outputs import OutputError, update_owned_files
from .run import ModelScore

PLOT_FILE = "quality.png"


def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _given(value: object) -> str:
    return "?" if value is None else str(value)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def quality_table(scores: list[ModelScore], highlight: str | None = None) -> str:
    rows = ["| model | decoder bpw | size | task accuracy | image KL | image top-1 | text KL | text PPL | MC accuracy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for s in scores:
        name = f"**{s.name}**" if s.name == highlight else s.name
        rows.append(f"| {name} | {_number(s.bpw, 3) if s.bpw else '16 (fp16)'} | {_size(s.size_bytes)} | {_number(s.task_accuracy, 3)} | "
                    f"{_number(s.image_kl)} | {_number(s.image_top1, 3)} | {_number(s.text_kl)} | {_number(s.text_ppl, 3)} | "
                    f"{_number(s.choice_accuracy, 3)} |")  # fmt: skip
    return "\n".join(rows)


def render_card(tier: str, quant: EXL2Metadata, size_bytes: int, scores: list[ModelScore] | None = None,
                eval_notes: dict[str, Any] | None = None) -> str:  # fmt: skip
    """Markdown for the tier directory named `tier` (e.g. 4.0bpw)."""
    source = quant.source_model or "the source model"
    calibration = quant.calibration
    head = quant.head_bpw or quant.head_bits
    parts = [
        "---",
        "library_name: exllamav2",
        "pipeline_tag: image-text-to-text",
        "tags: [exl2, pixtral, vision, quantized]",
        f"base_model: {source}",
        "---",
        "",
        f"# {source} — EXL2 {quant.bits} bpw",
        "",
        f"EXL2 quantization of **{source}** made with pixtral-exl2 ({quant.quantizer or ''}), loadable by exllamav2 "
        f"{quant.version or '0.3.2'} as is. The decoder is quantized; the vision tower, the multimodal projector, the "
        "embeddings and the norms are copied bit-identical from the source.",
        "",
        "| | |",
        "|---|---|",
        f"| decoder bits per weight | {_number(quant.decoder_bpw, 3)} (target {quant.bits}) |",
        f"| output head | {_number(head, 2) if isinstance(head, (int, float)) else head} bpw |",
        f"| weights on disk | {_size(size_bytes)} |",
        "| kept fp16 | vision tower, projector, token embeddings, norms |",
        f"| calibration | {_given(calibration.rows)} rows × {_given(calibration.length)} tokens, {calibration.images or 0} images; "
        f"{_given(calibration.dataset)} |",
        f"| image-token Hessian weight | {1.0 if calibration.image_token_weight is None else calibration.image_token_weight} |",
        f"| calibration-set KL vs fp16 | {_number(quant.calibration_kl, 5)} (last-layer logits on the calibration rows) |",
        "",
        "## Quality",
        "",
    ]
    if scores:
        parts += [f"Measured with `pixtral-exl2 eval` against the fp16 source ({_notes(eval_notes)}). Lower KL is closer to fp16.", "",
                  quality_table(scores, tier), "", f"![quality against bpw]({PLOT_FILE})", ""]  # fmt: skip
    else:
        parts += ["Not measured yet beyond the calibration set: run `pixtral-exl2 eval SOURCE_DIR THIS_DIR` to add the quality "
                  "table (perplexity and KL on text, KL and top-1 agreement on image prompts) and its plot to this card.", ""]  # fmt: skip
    parts += _how_to_run(tier)
    return "\n".join(parts) + "\n"


def _notes(notes: dict[str, Any] | None) -> str:
    if not notes:
        return "default sets"
    return ", ".join(f"{v} {k}" for k, v in notes.items() if v)


def _how_to_run(tier: str) -> list[str]:
    return [
        "## Run it",
        "",
        "```bash",
        "pip install pixtral-exl2            # with a CUDA torch first for the exllamav2 backend",
        f"pixtral-exl2 chat {tier}            # local chat; /image PATH attaches a picture",
        f"pixtral-exl2 serve {tier}           # OpenAI/TabbyAPI-compatible server on :5000",
        "```",
        "",
        "A TabbyAPI-style `config.yml` for `pixtral-exl2 serve --config config.yml` (the folder holding this tier is the model dir):",
        "",
        "```yaml",
        "model:",
        "  model_dir: models",
        f"  model_name: {tier}",
        "  max_seq_len: 16384",
        "  cache_mode: Q8",
        "  vision: true",
        "```",
        "",
        "`pixtral-exl2 serve` lays images out exactly as mistral-common does: `[IMG]…[IMG_BREAK]…[IMG_END]` grids on a "
        "16-px grid, our fp16 vision tower's features at the `[IMG]` positions. Without flash-attn ≥ 2.5.7 its exllamav2 "
        "backend runs unpaged with a causal-masked attention, one request at a time (`/v1/model` says which).",
        "",
        "## Serve it with TabbyAPI",
        "",
        "TabbyAPI's `exl2-checkpoint` branch (its main is exllamav3-only) serves this folder unmodified. Put it in "
        "TabbyAPI's `models/` folder and enable vision in TabbyAPI's `config.yml` (its default is off):",
        "",
        "```yaml",
        "model:",
        f"  model_name: {tier}",
        "  vision: true",
        "```",
        "",
        "Text, raw completions (`add_bos_token`) and the chat template (image parts, text before or after a picture) give "
        "mistral-common's tokens there. The picture itself is encoded by exllamav2's own Pixtral processor, which differs "
        "from mistral-common: it resizes images to multiples of 32 px (not 16) and ends the grid with an extra "
        "`[IMG_BREAK]` before `[IMG_END]`. On the project's demo model (4.0 tier, greedy) 21 of 24 picture answers were "
        "right with mistral-common's layout and 17 of 24 through exllamav2's processor; use `pixtral-exl2 serve` where "
        "the exact layout matters.",
    ]


def refresh_cards(source_name: str, tiers: list[Path], scores: list[ModelScore], sets: dict[str, int], plot: bytes, force: bool) -> list[str]:
    """Rewrite each tier's README.md and quality.png with the measured table; returns the tiers whose
    card was left alone (edited by someone since we wrote it, unless `force`)."""
    refused = []
    for score, tier in zip(scores[1:], tiers):
        quant = load_config(tier).quantization or EXL2Metadata()
        quant = replace(quant, source_model=quant.source_model or source_name)
        card = render_card(tier.name, quant, score.size_bytes, scores, sets)
        try:
            update_owned_files(tier, {"README.md": card.encode("utf-8"), PLOT_FILE: plot}, force)
        except OutputError as err:
            refused.append(str(err))
    return refused
