"""README.md's two opening commands are what CI runs: the install part of the first, then the second."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)[:2]


def test_ci_runs_readme_install_then_readme_tests() -> None:
    main_job, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    install = "pip install --no-deps torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu && pip install -e ."
    assert install in main_job and install in ci
    assert main_job.index("torch==2.13.0") < main_job.index("pip install -e")  # torch first: no CUDA build
    assert '".[test]"' not in main_job  # the main job needs none of the test oracles
    assert ci.strip().splitlines()[-1] == tests
    assert ci.index(install) < ci.index(tests)


def test_readme_main_job_uses_the_demo_model() -> None:
    main_job, _ = _readme_commands()
    assert "pixtral-exl2 demo-model demo" in main_job and "pixtral-exl2 quantize demo" in main_job
