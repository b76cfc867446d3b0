"""`demo-model`, `info`, `inspect`, `convert`: write, describe and convert model directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from cli.common import app, console, fail, human_bytes, human_count, progress_display


@app.command()
def info(
    model_dir: Annotated[Path, typer.Argument(help="An HF Llava/Pixtral model directory (fp16 or EXL2).")],
) -> None:
    """Show a model directory's architecture, parameter counts, tokenizer and files."""
    from pixtral.config import load_config
    from pixtral.model import parameter_counts
    from pixtral.tokenizer import PixtralTokenizer
    from pixtral.weights import Checkpoint

    cfg = load_config(model_dir)
    tokenizer = PixtralTokenizer(model_dir)
    with Checkpoint(model_dir) as ckpt:  # every shard header checked against its file size
        tensors, shards = len(ckpt.names()), len({ckpt.shard_of(n) for n in ckpt.names()})
    t, v = cfg.text, cfg.vision
    table = Table(title=f"{model_dir}", show_header=False)
    table.add_row(
        "decoder",
        f"{t.num_hidden_layers} layers, hidden {t.hidden_size}, heads {t.num_attention_heads}/{t.num_key_value_heads} "
        f"(head_dim {t.head_dim}), FFN {t.intermediate_size}, vocab {t.vocab_size}, rope θ {t.rope_theta:g}",
    )
    table.add_row(
        "vision",
        f"{v.num_hidden_layers} layers, hidden {v.hidden_size}, heads {v.num_attention_heads} "
        f"(head_dim {v.head_dim}), FFN {v.intermediate_size}, patch {v.patch_size}, max {v.image_size}px",
    )
    table.add_row("projector", f"{v.hidden_size}→{t.hidden_size}→{t.hidden_size}, bias {cfg.projector_bias}")
    ids = tokenizer.image_ids
    table.add_row(
        "tokens",
        f"[IMG] {ids.img}, [IMG_BREAK] {ids.img_break}, [IMG_END] {ids.img_end}, "
        f"BOS {tokenizer.bos_id}, EOS {tokenizer.eos_id}",
    )
    for part, count in parameter_counts(cfg).items():
        table.add_row(f"params: {part}", human_count(count))
    table.add_row("weights", f"{tensors} tensors in {shards} shard(s)")
    if cfg.quantization is not None:
        table.add_row("quantization", json.dumps(cfg.quantization.to_json()))
    console.print(table)


@app.command("demo-model")
def demo_model(
    out_dir: Annotated[Path, typer.Argument(help="Where to write the demo model (must not exist).")],
    force: Annotated[
        bool, typer.Option("--force", help="Replace OUT_DIR if pixtral-exl2 wrote it (other files are never deleted).")
    ] = False,
) -> None:
    """Write the embedded demo model: a small Pixtral (real architecture, Pixtral-Large's tokenizer)
    trained to answer questions about drawn shapes, in HF Llava layout, usable by every command."""
    from runtime.demo.model import write_demo_model

    with console.status("writing the demo model"):
        write_demo_model(out_dir, force=force)
    console.print(
        f"demo model written to [bold]{escape(str(out_dir))}[/]; pictures to ask about, with questions and "
        f"answers, in {escape(str(out_dir))}/examples/"
    )


@app.command()
def inspect(
    model_dir: Annotated[Path, typer.Argument(help="An EXL2 checkpoint directory (ours or exllamav2's).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Show an EXL2 checkpoint: bits per group, bpw and size of every layer, the decoder's total
    bpw, the head bits, what is kept fp16, and the files."""
    from pixtral.exl2.report import inspect_checkpoint

    report = inspect_checkpoint(model_dir)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        return
    table = Table(title=f"EXL2 layers of {model_dir}")
    table.add_column("layer", no_wrap=True)
    table.add_column("K × N'", no_wrap=True)
    table.add_column("groups (bits:count×rows)")
    table.add_column("bpw", justify="right")
    table.add_column("size", justify="right", no_wrap=True)
    for layer in report.layers:
        name = layer.name.removeprefix("language_model.").removeprefix("model.")
        table.add_row(
            name,
            f"{layer.in_features} × {layer.out_features}",
            layer.groups,
            f"{layer.bpw:.3f}",
            human_bytes(layer.bytes),
        )
    console.print(table)
    console.print(f"decoder bpw: [bold]{report.decoder_bpw:.4f}[/]   head bpw: {report.head_bpw or 'fp16'}")
    kept = ", ".join(
        f"{label} ({part.tensors} tensors, {human_count(part.params)} params, {'/'.join(part.dtypes)})"
        for label, part in report.kept_unquantized.items()
    )
    console.print(f"kept unquantized: {kept}")
    if report.quantization:
        console.print(f"quantization_config: {json.dumps(report.quantization.to_json())}")
    console.print("files: " + ", ".join(f"{f.name} ({human_bytes(f.bytes)})" for f in report.files))


@app.command()
def convert(
    src: Annotated[
        Path,
        typer.Argument(
            help="Mistral-native Pixtral: params.json, consolidated*.safetensors, tekken.json or tokenizer.model.v7m1."
        ),
    ],
    dst: Annotated[
        Path, typer.Argument(help="Where to write the HF Llava directory (must not exist, and not inside SRC).")
    ],
    dtype: Annotated[
        Optional[str], typer.Option(help="Store weights as float16, bfloat16 or float32 (default: as the source).")
    ] = None,
    shard_size: Annotated[int, typer.Option(help="Output shard size in MiB.", min=1, max=1 << 20)] = 4096,
    force: Annotated[
        bool, typer.Option("--force", help="Replace DST if pixtral-exl2 wrote it (other files are never deleted).")
    ] = False,
) -> None:
    """Convert Mistral's own Pixtral release into the HF Llava layout the quantizer and runtime read:
    renamed and q/k-permuted weights (streamed shard by shard), config, tokenizer, extended chat
    template, processor configs."""
    from convert.mistral import DTYPES
    from convert.mistral import convert as convert_checkpoint
    from pixtral.progress import Progress

    if dtype is not None and dtype not in DTYPES:
        raise fail(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    with progress_display() as on_progress:
        cfg = convert_checkpoint(
            src, dst, dtype, shard_size, force, lambda done, total: on_progress(Progress("convert", done, total))
        )
    console.print(
        f"converted to [bold]{escape(str(dst))}[/]: {cfg.text.num_hidden_layers} decoder layers, vision "
        f"{cfg.vision.num_hidden_layers} layers, "
        f"projector bias {cfg.projector_bias}"
    )
