"""What every subcommand shares: the typer app, error handling, progress display, number formatting.

Error contract (README): a `UserError` or `OSError` prints one line naming the file/field and exits 2;
Ctrl-C exits 130 with a word of what was kept; anything else is a bug: a short message, the path of a
saved traceback, exit 1. It is enforced once, in the group's `invoke`, so no command can forget it.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

from pixtral.errors import UserError, describe_os_error

console = Console()
err_console = Console(stderr=True)

USER_ERRORS: tuple[type[BaseException], ...] = (UserError, OSError)
PLAIN_PROGRESS_SECONDS = 10.0  # without a terminal, one line per stage at most this often
# Code an interrupt must not be raised in. A KeyboardInterrupt out of exec'd text (a dataclass's
# generated __init__) leaves CPython's "unhandled interrupt" flag set even when caught: the process
# then dies by SIGINT, not with its exit code. One out of an import leaves a C extension half
# initialised (seen: SIGABRT on the next import of triton).
NO_INTERRUPT_FILES = frozenset({"<string>", "<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>"})
INTERRUPT_RETRY_SECONDS = 0.05
INTERRUPT_DEFER_SECONDS = 5.0  # an import that long: act anyway, a Ctrl-C must never be lost


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` on stderr; return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True, markup=True)
    return typer.Exit(code)


class interrupts_at_safe_points:  # noqa: N801 - used as a context manager, named like one
    """Turn `signals` (Ctrl-C, a plain kill) into KeyboardInterrupt, but not inside an import or exec'd
    text started within the `with` body: there the signal comes back a moment later (after
    `defer_limit` seconds of that it is acted on regardless). `as` gives the signals acted on."""

    def __init__(
        self,
        signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
        defer_limit: float = INTERRUPT_DEFER_SECONDS,
    ) -> None:
        self.signals = signals
        self.defer_limit = defer_limit
        self.received: list[int] = []
        self.deferred_since: float | None = None

    def __enter__(self) -> list[int]:
        self.outer = sys._getframe(1)  # frames from here outwards are not ours to judge
        self.previous = {signum: signal.signal(signum, self.on_signal) for signum in self.signals}
        return self.received

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.in_no_interrupt_code(frame) and now - (self.deferred_since or now) < self.defer_limit:
            self.deferred_since = self.deferred_since or now
            retry = threading.Timer(INTERRUPT_RETRY_SECONDS, signal.raise_signal, (signum,))
            retry.daemon = True
            retry.start()
            return
        self.deferred_since = None
        self.received.append(signum)
        raise KeyboardInterrupt

    def in_no_interrupt_code(self, frame: FrameType | None) -> bool:
        while frame is not None and frame is not self.outer:
            if frame.f_code.co_filename in NO_INTERRUPT_FILES:
                return True
            frame = frame.f_back
        return False


def user_message(err: BaseException) -> str:
    """The one line a user sees for an expected failure."""
    if isinstance(err, OSError) and not isinstance(err, UserError):
        return describe_os_error(err)
    return str(err)


def save_traceback(err: BaseException) -> Path:
    """Write the traceback of an unexpected error to a file and return its path."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(tempfile.gettempdir()) / f"pixtral-exl2-crash-{stamp}-{os.getpid()}.txt"
    text = f"command: {' '.join(sys.argv)}\n\n" + "".join(traceback.format_exception(err))
    path.write_text(text, encoding="utf-8")
    return path


class GuardedGroup(TyperGroup):
    """Runs a subcommand under the error contract of this module."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError:
            raise
        except UsageError as err:  # a bad option value or a missing argument: one line, as every error
            where = err.ctx.command_path if err.ctx else ctx.command_path
            raise fail(f"{err.format_message()} (see `{where} --help`)") from None
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except KeyboardInterrupt:
            raise fail("interrupted; nothing half-written was kept", 130) from None
        except BrokenPipeError:  # output piped into `head`: stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(141) from None
        except USER_ERRORS as err:
            raise fail(user_message(err)) from None
        except Exception as err:  # a bug: keep the details, show a short line
            path = save_traceback(err)
            raise fail(
                f"internal error ({type(err).__name__}: {err}); traceback saved to {path}; please report it", 1
            ) from None


app = typer.Typer(
    name="pixtral-exl2",
    cls=GuardedGroup,
    help="Quantize Pixtral (12B, Large) to EXL2, convert Mistral-native checkpoints, run and inspect the results.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        from pixtral.version import VERSION

        console.print(f"pixtral-exl2 {VERSION}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Quantize Pixtral (12B, Large) to EXL2, convert Mistral-native checkpoints, run and inspect the results."""


THREADS_HELP = (
    "CPU threads for torch (default: all cores). Lower it when other work shares the machine: "
    "oversubscribed cores make every thread wait (README: threads)."
)


def set_threads(threads: int | None) -> None:
    """Apply a command's --threads (torch's intra-op threads) before any work."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


@contextmanager
def progress_display() -> Iterator[Callable[[Any], None]]:
    """Yield a callback for progress events (`.stage .done .total .detail`): rich bars on a terminal,
    plain timestamped lines otherwise (so a log file shows life during long work)."""
    if console.is_terminal:
        with _rich_bars() as callback:
            yield callback
    else:
        yield _plain_lines()


@contextmanager
def _rich_bars() -> Iterator[Callable[[Any], None]]:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description:<16}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bars:
        tasks: dict[str, Any] = {}

        def on_progress(event: Any) -> None:
            if event.stage not in tasks:
                tasks[event.stage] = bars.add_task(event.stage, total=event.total, detail="")
            bars.update(tasks[event.stage], completed=event.done, total=event.total, detail=event.detail)

        yield on_progress


def _plain_lines() -> Callable[[Any], None]:
    started: dict[str, float] = {}
    last_line: dict[str, float] = {}

    def on_progress(event: Any) -> None:
        now = time.monotonic()
        begun = started.setdefault(event.stage, now)
        finished = event.done >= event.total
        if finished or now - last_line.get(event.stage, -1e9) >= PLAIN_PROGRESS_SECONDS:
            last_line[event.stage] = now
            detail = f" {event.detail}" if event.detail else ""
            state = "done" if finished else f"{event.done}/{event.total}"
            print(
                f"[{datetime.datetime.now():%H:%M:%S}] {event.stage}: {state}{detail} ({now - begun:.1f} s)", flush=True
            )

    return on_progress
