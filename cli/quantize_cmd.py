"""`quantize`: one measurement, every EXL2 tier."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from cli.common import (
    THREADS_HELP,
    app,
    console,
    fail,
    human_bytes,
    interrupts_at_safe_points,
    progress_display,
    set_threads,
)


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        tiers = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise fail(f"--bpw: expected numbers separated by commas (e.g. 2.5,4.0,6.0), got {text!r}") from None
    if not tiers:
        raise fail(
            f"--bpw: no tier given ({text!r}); expected numbers separated by commas (e.g. 2.5,4.0,6.0), or leave "
            "it out for the recipe's"
        )
    return tiers


@app.command()
def quantize(
    model_dir: Annotated[Path, typer.Argument(help="HF Llava/Pixtral model directory (fp16/bf16).")],
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="Output: one complete EXL2 model directory per tier (OUT_DIR/4.0bpw/ …) and measurement.json."
        ),
    ],
    bpw: Annotated[
        Optional[str],
        typer.Option("--bpw", help="Target decoder bpw, comma-separated tiers (e.g. 2.5,3.0,4.0,6.0,8.0)."),
    ] = None,
    recipe: Annotated[
        str,
        typer.Option(
            help="Named tier set and calibration mix (shipped: default, text-only, headline, demo) or a .toml "
            "path; flags override it."
        ),
    ] = "default",
    head_bits: Annotated[Optional[int], typer.Option(help="Bits of the output head: 2, 3, 4, 5, 6 or 8.")] = None,
    rows: Annotated[
        Optional[int], typer.Option(help="Calibration rows for the quantization pass (1 to 100000).")
    ] = None,
    measure_rows: Annotated[
        Optional[int], typer.Option(help="How many of those rows measure every option (1 to --rows).")
    ] = None,
    length: Annotated[
        Optional[int], typer.Option(help="Tokens per calibration row (16 to the model's context).")
    ] = None,
    image_fraction: Annotated[
        Optional[float], typer.Option(help="Share of rows that open with image conversations (0 to 1).")
    ] = None,
    text_only: Annotated[
        bool, typer.Option("--text-only", help="Calibrate on text alone (same as --image-fraction 0).")
    ] = False,
    asymmetric: Annotated[
        Optional[bool],
        typer.Option(
            "--asymmetric/--symmetric",
            help="GPTQ each layer against the fp16 model's outputs on fp16 inputs (GPTAQ; the default), or "
            "against its own outputs on the tier's inputs (exllamav2's way).",
        ),
    ] = None,
    calibration_text: Annotated[
        Optional[list[Path]],
        typer.Option(help="Text/jsonl/parquet file or folder (repeatable); default: exllamav2's standard set."),
    ] = None,
    calibration_images: Annotated[
        Optional[list[Path]],
        typer.Option(
            help="Image folder (metadata.jsonl) or jsonl (repeatable); default: shipped photos + drawn charts/pages."
        ),
    ] = None,
    measurement: Annotated[
        Optional[Path], typer.Option(help="Reuse a measurement.json (ours or exllamav2's) and skip measuring.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    shard_size: Annotated[
        Optional[int], typer.Option(help="Output shard size in MiB (1 to 1048576; default 8192, as exllamav2).")
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="Calibration sampling seed (≥ 0).")] = None,
    threads: Annotated[
        Optional[int],
        typer.Option(
            help=THREADS_HELP + " With --workers: per worker (default: the cores shared out).", min=1, max=1024
        ),
    ] = None,
    workers: Annotated[
        Optional[int],
        typer.Option(
            help="Spread the tiers and the measurement's linears over N Ray workers: N local processes, or N GPUs "
            'with --device cuda (pip install -e ".[distributed]"). Same bytes as one process with the same '
            "--threads.",
            min=1,
            max=1024,
        ),
    ] = None,
    ray_address: Annotated[
        Optional[str],
        typer.Option(
            "--ray",
            help="Run on an existing Ray cluster at this address (host:6379 or ray://host:10001); OUT_DIR must be "
            "on storage every node sees. --workers defaults to its GPUs (else its CPUs / --threads).",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted job in OUT_DIR (same settings).")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Start over in an existing OUT_DIR: replaces its tiers, measurement.json and .work, nothing else.",
        ),
    ] = False,
    keep_work: Annotated[
        bool, typer.Option("--keep-work", help="Keep OUT_DIR/.work (row states, per-layer tensors) after success.")
    ] = False,
    skip_weight_check: Annotated[
        bool, typer.Option("--skip-weight-check", help="Do not scan every weight for NaN/inf first.")
    ] = False,
) -> None:
    """Measure once, then write one EXL2 checkpoint per target bpw: decoder quantized (GPTQ, bits
    allocated per layer), vision tower and projector copied bit-identical. Resumable."""
    from quantize.pipeline import run_quantize
    from recipes import quantize_config

    flags = {
        "tiers": _floats(bpw),
        "head_bits": head_bits,
        "measurement": measurement,
        "device": device,
        "shard_mb": shard_size,
        "resume": resume,
        "force": force,
        "keep_work": keep_work,
        "check_weights": not skip_weight_check,
        "asymmetric": asymmetric,
        "workers": workers,
        "ray_address": ray_address,
        "calibration": {
            "rows": rows,
            "measure_rows": measure_rows,
            "length": length,
            "seed": seed,
            "image_fraction": 0.0 if text_only else image_fraction,
            "text_sources": calibration_text or None,
            "image_sources": calibration_images or None,
        },
    }
    if resume and force:
        raise fail(
            "--resume and --force contradict each other: --resume continues the job in OUT_DIR, --force starts it over"
        )
    if threads is None and workers and workers > 1 and ray_address is None:
        threads = max(1, (os.cpu_count() or 1) // workers)  # local workers share the cores: no oversubscription
    set_threads(threads)
    config = quantize_config(recipe, model_dir, out_dir, flags)
    with interrupts_at_safe_points() as received:  # a kill (not -9) ends like Ctrl-C: state kept, hint given
        try:
            with progress_display() as on_progress:
                results = run_quantize(config, on_progress)
        except KeyboardInterrupt:
            terminated = signal.SIGTERM in received
            kept = config.work_dir.exists()
            hint = (
                f"continue with the same command plus --resume (state kept in {config.work_dir})"
                if kept
                else "nothing was written"
            )
            raise fail(f"{'terminated' if terminated else 'interrupted'}; {hint}", 143 if terminated else 130) from None
    caption = (
        "calibration-set KL: on the calibration rows themselves (every position, text and images), a check of the "
        "quantizer; held-out quality is `pixtral-exl2 eval`'s text and image KL"
    )
    table = Table(title=f"EXL2 tiers in {out_dir}", caption=escape(caption))
    for column in ("tier", "decoder bpw", "head bpw", "size", "calibration-set KL"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for r in results:
        table.add_row(r.name, f"{r.bpw:.4f}", f"{r.head_bpw:.2f}", human_bytes(r.size_bytes), f"{r.calibration_kl:.5f}")
    console.print(table)
    older = sorted(p.name for p in Path(out_dir).glob("*bpw") if p.is_dir() and p.name not in {r.name for r in results})
    if older:  # a --force or --measurement job into an output that held more tiers: say it is a mix of two jobs
        console.print(
            f"note: {escape(str(out_dir))} also holds {', '.join(older)} from an earlier job, not re-made by this one "
            "(nor any quality.png beside them); remove them or quantize into a new folder for one consistent set",
            soft_wrap=True,
        )
