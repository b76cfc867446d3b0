"""The README.md model card of an EXL2 tier, in the style of Hugging Face EXL2 cards.

`quantize` writes it with what it knows (bpw, size, head bits, calibration, the calibration-set KL);
`eval` (runtime/eval/card.py) rewrites it with its measured Quality section.
"""

from __future__ import annotations

from pixtral.exl2.metadata import EXL2Metadata


def number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _given(value: object) -> str:
    return "?" if value is None else str(value)


def size_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def render_card(tier: str, quant: EXL2Metadata, size_bytes: int, quality: list[str] | None = None) -> str:
    """Markdown for the tier directory named `tier` (e.g. 4.0bpw); `quality`: the Quality section's
    lines as eval measured them (None: not measured yet)."""
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
        f"| decoder bits per weight | {number(quant.decoder_bpw, 3)} (target {quant.bits}) |",
        f"| output head | {number(head, 2) if isinstance(head, (int, float)) else head} bpw |",
        f"| weights on disk | {size_text(size_bytes)} |",
        "| kept fp16 | vision tower, projector, token embeddings, norms |",
        f"| calibration | {_given(calibration.rows)} rows × {_given(calibration.length)} tokens, "
        f"{calibration.images or 0} images; {_given(calibration.dataset)} |",
        "| image-token Hessian weight | "
        f"{1.0 if calibration.image_token_weight is None else calibration.image_token_weight} |",
        f"| calibration-set KL vs fp16 | {number(quant.calibration_kl, 5)} "
        "(last-layer logits on the calibration rows) |",
        "",
        "## Quality",
        "",
    ]
    if quality:
        parts += quality
    else:
        parts += [
            "Not measured yet beyond the calibration set: run `pixtral-exl2 eval SOURCE_DIR THIS_DIR` to add the "
            "quality table (perplexity and KL on text, KL and top-1 agreement on image prompts) and its plot to "
            "this card.",
            "",
        ]
    parts += _how_to_run(tier)
    return "\n".join(parts) + "\n"


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
        "A TabbyAPI-style `config.yml` for `pixtral-exl2 serve --config config.yml` (the folder holding this tier "
        "is the model dir):",
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
        "16-px grid, our fp16 vision tower's features at the `[IMG]` positions. Without flash-attn ≥ 2.5.7 its "
        "exllamav2 backend runs unpaged with a causal-masked attention, one request at a time "
        "(`/v1/model` says which).",
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
        "Text, raw completions (`add_bos_token`) and the chat template (image parts, text before or after a "
        "picture) give mistral-common's tokens there. The picture itself is encoded by exllamav2's own Pixtral "
        "processor, which differs from mistral-common: it resizes images to multiples of 32 px (not 16) and ends "
        "the grid with an extra `[IMG_BREAK]` before `[IMG_END]`, a layout the model was not trained on. On the "
        "project's demo model (4.0 tier, greedy, `python bench/tabbyapi_image_layout.py`) both layouts answer 20 "
        "of 24 example picture questions right; use `pixtral-exl2 serve` where the exact layout matters.",
    ]
