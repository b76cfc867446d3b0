"""`pixtral-exl2`: the one console command, and the one layer that may import every package.

Each subcommand turns options into a config and calls a library function; rich output lives here
and nowhere else. The error contract is enforced once, in `common.GuardedGroup`.
"""

from __future__ import annotations

from cli import chat_cmd, eval_cmd, model_cmds, quantize_cmd, serve_cmd  # noqa: F401  (registers the subcommands)
from cli.common import app


def main() -> None:
    app()
