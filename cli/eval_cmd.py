"""`eval`: tiers against their fp16 source; a table, JSON, a plot, and refreshed model cards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from cli.common import THREADS_HELP, app, console, err_console, human_bytes, progress_display, set_threads


@app.command("eval")
def evaluate_command(
    source: Annotated[Path, typer.Argument(help="The fp16/bf16 source model directory.")],
    tiers: Annotated[
        list[Path], typer.Argument(help="EXL2 tier directories, or a quantize output folder (all its tiers).")
    ],
    backend: Annotated[
        str, typer.Option(help="auto (exllamav2 on CUDA, else reference), reference or exllamav2.")
    ] = "auto",
    device: Annotated[str, typer.Option(help="Reference backend: auto, cpu, cuda or cuda:N.")] = "auto",
    text: Annotated[
        Optional[list[Path]],
        typer.Option(help="Held-out text (txt/jsonl/parquet or folder; repeatable) instead of the default."),
    ] = None,
    choices: Annotated[
        Optional[Path], typer.Option(help="Multiple-choice image QA, jsonl of {image, question, choices, answer}.")
    ] = None,
    samples: Annotated[int, typer.Option(help="Questions (demo) or text documents to score.", min=8, max=100000)] = 256,
    as_json: Annotated[Optional[Path], typer.Option("--json", help="Also write the results as JSON here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Plot file (default: quality.png beside the tiers).")] = None,
    card: Annotated[bool, typer.Option(help="Refresh each tier's README.md model card and its quality.png.")] = True,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, min=1, max=1024)] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace model cards that were edited since pixtral-exl2 wrote them.")
    ] = False,
) -> None:
    """Measure tiers against the fp16 source: perplexity and KL on held-out text, KL and top-1
    agreement on image prompts, exact-answer accuracy on the demo task, multiple-choice accuracy.
    Prints a table, writes a plot, and refreshes each tier's model card."""
    from pixtral.outputs import atomic_write_bytes, check_outside_inputs
    from pixtral.progress import Progress
    from runtime.backends import BackendConfig, load_backend
    from runtime.eval.card import refresh_cards
    from runtime.eval.plot import quality_plot
    from runtime.eval.run import check_pairing, evaluate, tier_dirs
    from runtime.eval.sets import build_eval_set

    set_threads(threads)
    tier_paths = tier_dirs(tiers)
    check_pairing(source, tier_paths)
    plot_path = plot or tier_paths[0].parent / "quality.png"
    for output in (plot_path, as_json):
        if output is not None:
            check_outside_inputs(output, [source, *tier_paths], "output file")
    with console.status("building the evaluation set"):
        eval_set = build_eval_set(source, text, choices, samples)
    config = BackendConfig(backend=backend, device=device)
    with progress_display() as on_progress:
        scores = evaluate(
            source,
            tier_paths,
            eval_set,
            lambda path: load_backend(path, config),
            lambda name, done, total: on_progress(Progress("evaluate", done, total, name)),
        )
    _print_table(scores)
    image = quality_plot(scores, f"{source.name}: EXL2 tiers against fp16")
    atomic_write_bytes(plot_path, image)
    console.print(f"plot: {plot_path}", markup=False)
    if as_json:
        atomic_write_bytes(
            as_json,
            (
                json.dumps(
                    {"source": str(source), "sets": eval_set.describe(), "models": [s.to_json() for s in scores]},
                    indent=2,
                )
                + "\n"
            ).encode(),
        )
    if card:
        for warning in refresh_cards(source.name, tier_paths, scores, eval_set.describe(), image, force):
            err_console.print(f"[yellow]card not refreshed:[/] {escape(warning)}", soft_wrap=True)


def _print_table(scores) -> None:
    # a light box: nine columns fit an 80-column terminal
    table = Table(
        title="quality against fp16 (KL in nats per token; task, MC: accuracy; PPL: text)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in ("model", "bpw", "size", "task", "img KL", "img top1", "text KL", "PPL", "MC"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=True)

    def f(value, digits=4):
        return "–" if value is None else f"{value:.{digits}f}"

    for s in scores:
        table.add_row(
            s.name,
            f(s.bpw, 3) if s.bpw else "16",
            human_bytes(s.size_bytes),
            f(s.task_accuracy, 3),
            f(s.image_kl),
            f(s.image_top1, 3),
            f(s.text_kl),
            f(s.text_ppl, 2),
            f(s.choice_accuracy, 3),
        )
    console.print(table)
