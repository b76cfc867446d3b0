"""`serve`: the TabbyAPI-compatible OpenAI server."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from cli.common import THREADS_HELP, app, console, fail, set_threads


@app.command()
def serve(
    model: Annotated[
        Optional[Path], typer.Argument(help="A model to serve (its folder becomes model_dir), or a folder of models.")
    ] = None,
    config: Annotated[
        Optional[Path],
        typer.Option("--config", help="config.yml (TabbyAPI layout); `--write-config FILE` writes the sample."),
    ] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to listen on (network.host).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (network.port).", min=1, max=65535)] = None,
    backend: Annotated[Optional[str], typer.Option(help="auto, exllamav2 or reference (model.backend).")] = None,
    context: Annotated[Optional[int], typer.Option(help="Context length (model.max_seq_len).", min=16)] = None,
    cache_mode: Annotated[
        Optional[str], typer.Option(help="exllamav2 KV cache: FP16, Q8, Q6, Q4 (model.cache_mode).")
    ] = None,
    max_concurrent: Annotated[
        Optional[int], typer.Option(help="Generations at once (limits.max_concurrent_requests).", min=1)
    ] = None,
    disable_auth: Annotated[
        bool, typer.Option("--disable-auth", help="No API keys: every caller is admin (local use only).")
    ] = False,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, min=1, max=1024)] = None,
    write_config: Annotated[Optional[Path], typer.Option(help="Write the sample config.yml here and exit.")] = None,
) -> None:
    """Serve a tier over OpenAI's API (chat and text completions, images, streaming, tools) and
    TabbyAPI's routes (model load/unload, token encode/decode, /props, /health, /metrics)."""
    from pixtral.outputs import check_replaceable, check_writable
    from runtime.server.config import SAMPLE_CONFIG, load_server_config, with_overrides

    if write_config is not None:
        check_replaceable(
            write_config, False, "serve", hint="it may hold your settings: remove it or choose another path"
        )
        check_writable(write_config)
        shutil.copyfile(SAMPLE_CONFIG, write_config)
        console.print(f"sample config written to [bold]{escape(str(write_config))}[/]")
        return
    set_threads(threads)
    settings = load_server_config(config)
    model_dir, model_name = _model_location(model)
    settings = with_overrides(
        settings,
        network__host=host,
        network__port=port,
        network__disable_auth=disable_auth or None,
        model__backend=backend,
        model__max_seq_len=context,
        model__cache_mode=cache_mode,
        model__model_dir=model_dir,
        model__model_name=model_name,
        limits__max_concurrent_requests=max_concurrent,
    )
    _run(settings)


def _model_location(model: Path | None) -> tuple[str | None, str | None]:
    """(model_dir, model_name) for the positional argument: a model folder, or a folder of models."""
    from pixtral.errors import OptionError

    if model is None:
        return None, None
    if (model / "config.json").is_file():
        return str(model.resolve().parent), model.resolve().name
    if model.is_dir():
        return str(model), None
    raise OptionError(f"{model}: not a model directory (no config.json) nor a folder of models")


def _run(settings) -> None:
    try:
        from runtime.server.run import bind_socket, serve_forever
    except ImportError as err:
        raise fail(
            f"the server needs its extra dependencies ({err.name} is missing): pip install 'pixtral-exl2[serve]'"
        ) from None
    from runtime.server.auth import load_or_create_keys
    from runtime.server.models import ModelHost

    keys = None
    if not settings.network.disable_auth:
        path = Path(settings.network.api_tokens_file)
        keys, created = load_or_create_keys(path)
        if created:
            console.print(
                f"new API keys written to [bold]{escape(str(path))}[/] (mode 0600):\n  api key   {keys.api_key}\n  "
                f"admin key {keys.admin_key}"
            )
        else:
            console.print(f"API keys from [bold]{escape(str(path))}[/]")
    name = settings.model.model_name
    if name:
        ModelHost(settings).path_of(name)  # a bad name fails here, with exit 2, not inside uvicorn
    sock = bind_socket(settings.network.host, settings.network.port)
    where = f"http://{settings.network.host}:{settings.network.port}"
    console.print(
        f"serving {escape('model ' + name) if name else 'no model yet (POST /v1/model/load)'} from "
        f"{escape(str(settings.model.model_dir))} on {where}"
        f"{' [bold red](auth disabled)[/]' if keys is None else ''}"
    )
    serve_forever(settings, keys, name, sock)
