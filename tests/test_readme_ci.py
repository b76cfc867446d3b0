"""README.md's two opening commands are what CI runs: the install part of the first, then the second."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)[:2]


def test_ci_runs_readme_install_then_readme_tests() -> None:
    main_job, tests = _readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    install = (
        "pip install --no-deps torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu && pip install -e ."
    )
    assert install in main_job and install in ci
    assert main_job.index("torch==2.13.0") < main_job.index("pip install -e")  # torch first: no CUDA build
    assert '".[test]"' not in main_job  # the main job needs none of the test oracles
    assert ci.strip().splitlines()[-1] == tests
    assert ci.index(install) < ci.index(tests)


def test_readme_main_job_uses_the_demo_model() -> None:
    main_job, _ = _readme_commands()
    assert "pixtral-exl2 demo-model demo" in main_job and "pixtral-exl2 quantize demo" in main_job


def _fake_wheel(index: Path, version: str) -> None:
    """A one-project simple index holding an empty torch wheel of `version`."""
    import base64
    import hashlib
    import zipfile

    info = f"torch-{version}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    digest = {
        k: base64.urlsafe_b64encode(hashlib.sha256(v.encode()).digest()).rstrip(b"=").decode() for k, v in files.items()
    }
    name = f"torch-{version}-py3-none-any.whl"
    (index / "torch").mkdir(parents=True)
    with zipfile.ZipFile(index / "torch" / name, "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)
        wheel.writestr(
            f"{info}/RECORD",
            "".join(f"{k},sha256={digest[k]},{len(v)}\n" for k, v in files.items()) + f"{info}/RECORD,,\n",
        )
    (index / "torch" / "index.html").write_text(f'<a href="{name}">{name}</a>')
    (index / "index.html").write_text('<a href="torch/">torch</a>')


def test_readme_torch_install_takes_the_cpu_wheel_on_an_ordinary_machine(tmp_path: Path) -> None:
    """README's torch step on a machine with the public indexes only: the package index's plain
    2.13.0 (the CUDA build on Linux) and PyTorch's CPU index's 2.13.0+cpu, both offered; pip must take
    +cpu. Here both indexes are local stand-ins and pip's own config is ignored (no local wheels)."""
    main_job, _ = _readme_commands()
    step = re.search(r"pip install (--no-deps torch==\S+) --extra-index-url (\S+)", main_job)
    assert step and step.group(2) == "https://download.pytorch.org/whl/cpu"
    _fake_wheel(tmp_path / "pypi", "2.13.0")
    _fake_wheel(tmp_path / "cpu", "2.13.0+cpu")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    args = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        *step.group(1).split(),
        "--index-url",
        (tmp_path / "pypi").as_uri(),
        "--extra-index-url",
        (tmp_path / "cpu").as_uri(),
    ]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Would install torch-2.13.0+cpu" in result.stdout, result.stdout
