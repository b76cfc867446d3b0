"""Times README's main job on this machine: write the demo model, quantize it into every tier,
evaluate the tiers (each command as a user runs it, in a fresh temporary folder).

    python bench/main_job.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (
    ["demo-model", "demo"],
    ["quantize", "demo", "demo-exl2", "--recipe", "demo"],
    ["eval", "demo", "demo-exl2"],
)


def main() -> None:
    timings = []
    with tempfile.TemporaryDirectory() as tmp:
        for args in COMMANDS:
            started = time.monotonic()
            subprocess.run(
                [sys.executable, "-m", "cli", *args],
                cwd=tmp,
                check=True,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            timings.append((" ".join(["pixtral-exl2", *args]), time.monotonic() - started))
    print(f"README main job on {os.cpu_count()} CPU cores:")
    for command, seconds in timings:
        print(f"  {seconds:7.1f} s  {command}")
    print(f"  {sum(s for _, s in timings):7.1f} s  total")


if __name__ == "__main__":
    main()
