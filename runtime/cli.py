"""`pixtral-exl2`: the one console command. Each subcommand turns options into a config and calls a
library function; rich output lives here and nowhere else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from quantize.job import QuantizeConfig

app = typer.Typer(
    name="pixtral-exl2",
    help="Quantize Pixtral (12B, Large) to EXL2, convert Mistral-native checkpoints, and inspect the results.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

# errors a user can fix: printed as one clear line, exit code 2
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FileExistsError)


def fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(n)


@app.command()
def info(model_dir: Annotated[Path, typer.Argument(help="An HF Llava/Pixtral model directory (fp16 or EXL2).")]) -> None:
    """Show a model directory's architecture, parameter counts, tokenizer and files."""
    from runtime.config import load_config, parameter_counts
    from runtime.tokenizer import PixtralTokenizer

    try:
        cfg = load_config(model_dir)
        tokenizer = PixtralTokenizer(model_dir)
    except USER_ERRORS as err:
        raise fail(str(err)) from err
    t, v = cfg.text, cfg.vision
    table = Table(title=f"{model_dir}", show_header=False)
    table.add_row("decoder", f"{t.num_hidden_layers} layers, hidden {t.hidden_size}, heads {t.num_attention_heads}/{t.num_key_value_heads} "
                  f"(head_dim {t.head_dim}), FFN {t.intermediate_size}, vocab {t.vocab_size}, rope θ {t.rope_theta:g}")  # fmt: skip
    table.add_row("vision", f"{v.num_hidden_layers} layers, hidden {v.hidden_size}, heads {v.num_attention_heads} "
                  f"(head_dim {v.head_dim}), FFN {v.intermediate_size}, patch {v.patch_size}, max {v.image_size}px")  # fmt: skip
    table.add_row("projector", f"{v.hidden_size}→{t.hidden_size}→{t.hidden_size}, bias {cfg.projector_bias}")
    ids = tokenizer.image_ids
    table.add_row("tokens", f"[IMG] {ids.img}, [IMG_BREAK] {ids.img_break}, [IMG_END] {ids.img_end}, "
                  f"BOS {tokenizer.bos_id}, EOS {tokenizer.eos_id}")  # fmt: skip
    for part, count in parameter_counts(cfg).items():
        table.add_row(f"params: {part}", _human_count(count))
    quant = cfg.extra.get("quantization_config")
    if quant:
        table.add_row("quantization", json.dumps(quant))
    console.print(table)


@app.command("demo-model")
def demo_model(
    out_dir: Annotated[Path, typer.Argument(help="Where to write the demo model (must not exist).")],
    seed: Annotated[Optional[int], typer.Option(help="Weights seed (default: the embedded demo's).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite OUT_DIR if it exists.")] = False,
) -> None:
    """Write the embedded demo model: a small Pixtral (real architecture, real 12B tokenizer) in HF
    Llava layout, usable as input to every other command."""
    from runtime.synthetic import demo_spec, write_random_model

    try:
        with console.status("writing the demo model"):
            write_random_model(out_dir, demo_spec(seed), force=force)
    except USER_ERRORS as err:
        raise fail(str(err)) from err
    console.print(f"demo model written to [bold]{out_dir}[/]")


@app.command()
def inspect(
    model_dir: Annotated[Path, typer.Argument(help="An EXL2 checkpoint directory (ours or exllamav2's).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Show an EXL2 checkpoint: bits per group, bpw and size of every layer, the decoder's total
    bpw, the head bits, what is kept fp16, and the files."""
    from quantize.report import inspect_checkpoint

    try:
        report = inspect_checkpoint(model_dir)
    except USER_ERRORS as err:
        raise fail(str(err)) from err
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title=f"EXL2 layers of {model_dir}")
    table.add_column("layer", no_wrap=True)
    table.add_column("K × N'", no_wrap=True)
    table.add_column("groups (bits:count×rows)")
    table.add_column("bpw", justify="right")
    table.add_column("size", justify="right", no_wrap=True)
    for layer in report["layers"]:
        name = layer["name"].removeprefix("language_model.").removeprefix("model.")
        table.add_row(name, f"{layer['in_features']} × {layer['out_features']}", layer["groups"],
                      f"{layer['bpw']:.3f}", _human_bytes(layer["bytes"]))  # fmt: skip
    console.print(table)
    console.print(f"decoder bpw: [bold]{report['decoder_bpw']:.4f}[/]   head bpw: {report['head_bpw'] or 'fp16'}")
    kept = ", ".join(f"{k} ({v['tensors']} tensors, {_human_count(v['params'])} params, {'/'.join(v['dtypes'])})"
                     for k, v in report["kept_unquantized"].items())  # fmt: skip
    console.print(f"kept unquantized: {kept}")
    if report["quantization_config"]:
        console.print(f"quantization_config: {json.dumps(report['quantization_config'])}")
    console.print("files: " + ", ".join(f"{f['name']} ({_human_bytes(f['bytes'])})" for f in report["files"]))


def _floats(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise fail(f"--bpw: expected numbers separated by commas (e.g. 2.5,4.0,6.0), got {text!r}") from None


def _quantize_config(model_dir: Path, out_dir: Path, recipe: str, overrides: dict) -> "QuantizeConfig":
    """Recipe values, then the flags that were given."""
    from calibration.rows import CalibrationSpec
    from quantize.job import QuantizeConfig
    from recipes import load_recipe

    base = load_recipe(recipe)
    calibration = {**base.get("calibration", {}), **{k: v for k, v in overrides.pop("calibration").items() if v is not None}}
    fields = {k: v for k, v in overrides.items() if v is not None}
    return QuantizeConfig(
        model_dir=model_dir,
        out_dir=out_dir,
        tiers=tuple(fields.pop("tiers", None) or base.get("bpw", (4.0,))),
        head_bits=fields.pop("head_bits", base.get("head_bits", 6)),
        calibration=CalibrationSpec(**calibration),
        **fields,
    )


@app.command()
def quantize(
    model_dir: Annotated[Path, typer.Argument(help="HF Llava/Pixtral model directory (fp16/bf16).")],
    out_dir: Annotated[Path, typer.Argument(help="Output: one complete EXL2 model directory per tier (OUT_DIR/4.0bpw/ …) and measurement.json.")],
    bpw: Annotated[Optional[str], typer.Option("--bpw", help="Target decoder bpw, comma-separated tiers (e.g. 2.5,3.0,4.0,6.0,8.0).")] = None,
    recipe: Annotated[str, typer.Option(help="Named tier set and calibration mix (shipped: default, text-only, headline, demo) or a .toml path; flags override it.")] = "default",
    head_bits: Annotated[Optional[int], typer.Option(help="Bits of the output head: 2, 3, 4, 5, 6 or 8.")] = None,
    rows: Annotated[Optional[int], typer.Option(help="Calibration rows for the quantization pass.")] = None,
    measure_rows: Annotated[Optional[int], typer.Option(help="How many of those rows measure every option.")] = None,
    length: Annotated[Optional[int], typer.Option(help="Tokens per calibration row.")] = None,
    image_fraction: Annotated[Optional[float], typer.Option(help="Share of rows that open with image conversations.")] = None,
    text_only: Annotated[bool, typer.Option("--text-only", help="Calibrate on text alone (same as --image-fraction 0).")] = False,
    calibration_text: Annotated[Optional[list[Path]], typer.Option(help="Text/jsonl/parquet file or folder (repeatable); default: exllamav2's standard set.")] = None,
    calibration_images: Annotated[Optional[list[Path]], typer.Option(help="Image folder (metadata.jsonl) or jsonl (repeatable); default: shipped photos + drawn charts/pages.")] = None,
    measurement: Annotated[Optional[Path], typer.Option(help="Reuse a measurement.json (ours or exllamav2's) and skip measuring.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    shard_size: Annotated[Optional[int], typer.Option(help="Output shard size in MiB (default 8192, as exllamav2).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Calibration sampling seed.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted job in OUT_DIR (same settings).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over in an existing OUT_DIR, overwriting its tiers.")] = False,
    keep_work: Annotated[bool, typer.Option("--keep-work", help="Keep OUT_DIR/.work (row states, per-layer tensors) after success.")] = False,
    save_every: Annotated[Optional[float], typer.Option(help="Seconds between saves of the row states (resume points); default 180.")] = None,
    skip_weight_check: Annotated[bool, typer.Option("--skip-weight-check", help="Do not scan every weight for NaN/inf first.")] = False,
) -> None:
    """Measure once, then write one EXL2 checkpoint per target bpw: decoder quantized (GPTQ, bits
    allocated per layer), vision tower and projector copied bit-identical. Resumable."""
    from quantize.pipeline import run_quantize

    overrides = {
        "tiers": _floats(bpw), "head_bits": head_bits, "measurement": measurement, "device": device,
        "shard_mb": shard_size, "resume": resume, "force": force, "keep_work": keep_work, "checkpoint_seconds": save_every,
        "check_weights": not skip_weight_check,
        "calibration": {"rows": rows, "measure_rows": measure_rows, "length": length, "seed": seed,
                        "image_fraction": 0.0 if text_only else image_fraction,
                        "text_sources": tuple(map(str, calibration_text)) if calibration_text else None,
                        "image_sources": tuple(map(str, calibration_images)) if calibration_images else None},
    }  # fmt: skip
    try:
        config = _quantize_config(model_dir, out_dir, recipe, overrides)
        with _progress_display() as on_progress:
            results = run_quantize(config, on_progress)
    except USER_ERRORS as err:
        raise fail(str(err)) from err
    except KeyboardInterrupt:
        raise fail(f"interrupted; continue with the same command plus --resume (state kept in {out_dir}/.work)", 130) from None
    table = Table(title=f"EXL2 tiers in {out_dir}")
    for column in ("tier", "decoder bpw", "head bpw", "size", "calibration KL vs fp16"):
        table.add_column(column, justify="left" if column == "tier" else "right")
    for r in results:
        table.add_row(r.name, f"{r.bpw:.4f}", f"{r.head_bpw:.2f}", _human_bytes(r.size_bytes), f"{r.calibration_kl:.5f}")
    console.print(table)


def _progress_display():
    """A rich progress bar per stage; returns a context manager yielding the callback."""
    from contextlib import contextmanager

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    @contextmanager
    def display():
        columns = (TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())  # fmt: skip
        with Progress(*columns, console=console, transient=False) as bars:
            tasks: dict[str, int] = {}

            def on_progress(event) -> None:
                if event.stage not in tasks:
                    tasks[event.stage] = bars.add_task(event.stage, total=event.total, detail="")
                bars.update(tasks[event.stage], completed=event.done, total=event.total, detail=event.detail)

            yield on_progress

    return display()


def _human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="Mistral-native Pixtral: params.json, consolidated*.safetensors, tekken.json or tokenizer.model.v7m1.")],
    dst: Annotated[Path, typer.Argument(help="Where to write the HF Llava directory (must not exist).")],
    dtype: Annotated[Optional[str], typer.Option(help="Store weights as float16, bfloat16 or float32 (default: as the source).")] = None,
    shard_size: Annotated[int, typer.Option(help="Output shard size in MiB.")] = 4096,
    force: Annotated[bool, typer.Option("--force", help="Overwrite DST if it exists.")] = False,
) -> None:
    """Convert Mistral's own Pixtral release into the HF Llava layout the quantizer and runtime read:
    renamed and q/k-permuted weights (streamed shard by shard), config, tokenizer, extended chat
    template, processor configs."""
    from quantize.convert_mistral import DTYPES, convert as convert_checkpoint
    from quantize.pipeline import Progress

    if dtype is not None and dtype not in DTYPES:
        raise fail(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        with _progress_display() as on_progress:
            cfg = convert_checkpoint(src, dst, dtype, shard_size, force, lambda done, total: on_progress(Progress("convert", done, total)))
    except USER_ERRORS as err:
        raise fail(str(err)) from err
    console.print(f"converted to [bold]{dst}[/]: {cfg.text.num_hidden_layers} decoder layers, vision {cfg.vision.num_hidden_layers} layers, "
                  f"projector bias {cfg.projector_bias}")  # fmt: skip


def main() -> None:
    app()


if __name__ == "__main__":
    main()
