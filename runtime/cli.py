"""`pixtral-exl2`: the one console command. Each subcommand turns options into a config and calls a
library function; rich output lives here and nowhere else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

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
        raise fail(str(err))
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
        raise fail(str(err))
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
        raise fail(str(err))
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


def _human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def main() -> None:
    app()


if __name__ == "__main__":
    main()
