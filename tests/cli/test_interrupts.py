"""`interrupts_at_safe_points`: a signal never becomes a KeyboardInterrupt inside exec'd text or an
import, where CPython cannot take one back (the 1-in-20 `quantize` killed by SIGTERM that died by
SIGINT instead of exiting 143)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).parents[2]

SCRIPT = """
import os, signal, sys, time
from cli.common import interrupts_at_safe_points

with interrupts_at_safe_points(defer_limit={defer_limit}) as received:
    try:
        {body}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # plain code: where the retried signal must land
            time.sleep(0.001)
    except KeyboardInterrupt:
        print("interrupted after", sys.modules.get("halfway") and sys.modules["halfway"].DONE, received)
        sys.exit(143)
sys.exit(1)
"""


def run(body: str, tmp_path: Path, defer_limit: float = 5.0) -> subprocess.CompletedProcess:
    (tmp_path / "halfway.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\nDONE = True\n")
    (tmp_path / "job.py").write_text(
        SCRIPT.format(body=textwrap.indent(body, " " * 8).strip(), defer_limit=defer_limit)
    )
    env = {"PYTHONPATH": f"{REPO}:{tmp_path}", "PATH": "/usr/bin:/bin"}
    # `-m`, as the console command runs: only that path ends by SIGINT when CPython's flag is left set
    return subprocess.run([sys.executable, "-m", "job"], env=env, capture_output=True, text=True, timeout=60)


def test_a_signal_inside_exec_text_is_acted_on_after_it_and_the_exit_code_holds(tmp_path: Path) -> None:
    # exec of text is how dataclasses build __init__; an interrupt raised in there made the process
    # die by SIGINT (-2) at exit even though the code caught it and called sys.exit(143)
    done = run('exec("os.kill(os.getpid(), signal.SIGTERM)\\nfor _ in range(10**5): pass")', tmp_path)
    assert done.returncode == 143, (done.returncode, done.stdout, done.stderr)
    assert "[15]" in done.stdout  # SIGTERM, acted on once


def test_a_signal_inside_an_import_lets_the_import_finish(tmp_path: Path) -> None:
    done = run("import halfway", tmp_path)
    assert done.returncode == 143, (done.returncode, done.stdout, done.stderr)
    assert "interrupted after True [15]" in done.stdout  # the module ran to its end before the interrupt


def test_code_that_never_leaves_exec_is_still_interrupted(tmp_path: Path) -> None:
    done = run('exec("os.kill(os.getpid(), signal.SIGTERM)\\nwhile True: pass")', tmp_path, defer_limit=0.3)
    assert "interrupted after None [15]" in done.stdout, (done.returncode, done.stdout, done.stderr)


def test_the_previous_handlers_come_back(tmp_path: Path) -> None:
    import signal

    from cli.common import interrupts_at_safe_points

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with interrupts_at_safe_points():
        assert signal.getsignal(signal.SIGTERM) not in before
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
