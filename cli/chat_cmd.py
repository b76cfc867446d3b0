"""`chat`: a local chat on one workstation, interactive or scripted through piped stdin."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from cli.common import THREADS_HELP, USER_ERRORS, app, console, err_console, human_bytes, set_threads, user_message

HELP = """commands: /image PATH (attach to the next message; repeatable)  /system TEXT  /reset
          /save FILE  /load FILE  /help  /exit   (anything else is a message)"""


def parse_split(text: str | None) -> tuple[float, ...] | None:
    from pixtral.errors import OptionError

    if not text:
        return None
    try:
        split = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise OptionError(f"--gpu-split: expected GB per GPU separated by commas (e.g. 20,24), got {text!r}") from None
    if any(gb <= 0 for gb in split):
        raise OptionError(f"--gpu-split: every GPU needs a positive share, got {text!r}")
    return split


def _lines(interactive: bool) -> Iterator[str]:
    while True:
        try:
            line = console.input("[bold cyan]you>[/] ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        yield line.rstrip("\n")


@app.command()
def chat(
    model_dir: Annotated[Path, typer.Argument(help="An EXL2 tier or an fp16 model directory.")],
    backend: Annotated[
        str, typer.Option(help="auto (exllamav2 on CUDA, else reference), reference or exllamav2.")
    ] = "auto",
    device: Annotated[str, typer.Option(help="Reference backend: auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[
        Optional[str], typer.Option(help="Reference backend compute dtype: float32 (CPU default), bfloat16, float16.")
    ] = None,
    context: Annotated[
        Optional[int], typer.Option(help="Context length in tokens (default: the model's).", min=16)
    ] = None,
    cache_mode: Annotated[str, typer.Option(help="exllamav2 KV cache: FP16, Q8, Q6 or Q4.")] = "FP16",
    gpu_split: Annotated[
        Optional[str], typer.Option(help="exllamav2: GB of weights per GPU, e.g. 20,24 (default: autosplit).")
    ] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    image: Annotated[Optional[list[Path]], typer.Option(help="Image(s) for the first message (repeatable).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most new tokens per reply.", min=1)] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy.", min=0.0)] = 0.7,
    top_k: Annotated[int, typer.Option(help="0 = off.", min=0)] = 0,
    top_p: Annotated[float, typer.Option(help="1 = off.", min=0.0, max=1.0)] = 0.9,
    min_p: Annotated[float, typer.Option(help="0 = off.", min=0.0, max=1.0)] = 0.0,
    typical: Annotated[float, typer.Option(help="1 = off.", min=0.0, max=1.0)] = 1.0,
    repetition_penalty: Annotated[float, typer.Option(help="1 = off.", min=0.01)] = 1.0,
    presence_penalty: Annotated[float, typer.Option(min=-2.0, max=2.0)] = 0.0,
    frequency_penalty: Annotated[float, typer.Option(min=-2.0, max=2.0)] = 0.0,
    seed: Annotated[Optional[int], typer.Option(help="Same seed, same replies.", min=0)] = None,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, min=1, max=1024)] = None,
) -> None:
    """Chat with a model: streamed replies through its chat template, images with /image, token
    counts and speed after each reply. Lines piped on stdin are read as typed (for scripts)."""
    from pixtral.config import load_config
    from pixtral.image import open_image
    from pixtral.tokenizer import PixtralTokenizer
    from runtime.backends import BackendConfig, load_backend
    from runtime.chat import ChatSession
    from runtime.engine import Engine, GenerationParams
    from runtime.sampling import SamplingParams

    set_threads(threads)
    sampling = SamplingParams(
        temperature, top_k, top_p, min_p, typical, repetition_penalty, presence_penalty, frequency_penalty, seed=seed
    )
    config = BackendConfig(backend, device, dtype, context, cache_mode, parse_split(gpu_split))
    load_config(model_dir)  # not a model (a quantize output folder, say): said before anything loads
    tokenizer = PixtralTokenizer(model_dir)
    for path in image or []:
        open_image(path.expanduser())  # a bad picture is refused before minutes of loading
    with console.status(f"loading {model_dir}"):
        loaded = load_backend(model_dir, config)
    memory = loaded.memory()
    console.print(
        f"[dim]{loaded.name} backend, context {loaded.max_seq_len}, vision {'yes' if loaded.has_vision else 'no'}, "
        f"weights {human_bytes(memory['weights'])}, KV {human_bytes(memory['kv_per_token'])}/token. /help for "
        "commands.[/]",
        soft_wrap=True,
    )
    session = ChatSession(Engine(loaded, tokenizer), GenerationParams(max_new_tokens=max_tokens, sampling=sampling))
    if system:
        session.set_system(system)
    for path in image or []:
        session.attach(path)
    interactive = sys.stdin.isatty()
    for line in _lines(interactive):
        if not line.strip():
            continue
        try:
            if not _command(session, line):
                return
        except USER_ERRORS as err:
            err_console.print(f"[bold red]error:[/] {escape(user_message(err))}", highlight=False, soft_wrap=True)
        except KeyboardInterrupt:
            err_console.print("[dim](interrupted; the conversation is as before this message)[/]")


def _command(session, line: str) -> bool:
    """Carry out one input line; False to end the chat."""
    from runtime.chat import ChatError

    word, _, rest = line.strip().partition(" ")
    rest = rest.strip()
    if word in ("/exit", "/quit"):
        return False
    if word == "/help":
        console.print(HELP, highlight=False)
    elif word == "/image":
        if not rest:
            raise ChatError("/image needs a file path")
        image = session.attach(rest)
        rows, cols = image.grid
        console.print(
            f"[dim]attached {escape(rest)} ({cols}×{rows} patches, {rows * (cols + 1)} tokens) to the next message[/]"
        )
    elif word == "/system":
        session.set_system(rest)
        console.print("[dim]system prompt " + ("set" if rest else "cleared") + "[/]")
    elif word == "/reset":
        session.reset()
        console.print("[dim]conversation cleared[/]")
    elif word == "/save":
        console.print(f"[dim]saved to {escape(str(session.save(rest or 'chat.json')))}[/]")
    elif word == "/load":
        if not rest:
            raise ChatError("/load needs a file path")
        console.print(f"[dim]loaded {session.load(rest)} messages[/]")
    elif word.startswith("/") and len(word) > 1 and " " not in word and word[1:].isalpha():
        raise ChatError(f"unknown command {word}; /help lists them")
    else:
        _reply(session, line)
    return True


def _reply(session, text: str) -> None:
    started = time.perf_counter()
    for index, chunk in enumerate(session.ask(text)):
        if index == 0:  # after the prompt was accepted: errors come before any reply text
            console.print("[bold green]model>[/] ", end="")
        console.out(chunk.text, end="", highlight=False)
        usage, finish = chunk.usage, chunk.finish_reason
    console.print()
    speed = f"{usage.decode_tokens_per_second:.1f} tok/s" if usage.completion_tokens > 1 else "-"
    console.print(
        f"[dim]{usage.prompt_tokens} prompt tokens ({usage.cached_tokens} cached), {usage.completion_tokens} new, "
        f"{speed}, {time.perf_counter() - started:.2f} s, {finish}[/]",
        highlight=False,
        soft_wrap=True,
    )
