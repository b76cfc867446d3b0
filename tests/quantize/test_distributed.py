"""quantize --workers N on the demo model with CPU Ray workers (a local cluster the job starts, and a
`ray start` cluster): the bytes of one process, a worker killed mid-job retried, a clear error
without Ray."""

from __future__ import annotations

import contextlib
import filecmp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from runtime.demo.model import write_demo_model

pytest.importorskip("ray")
pytestmark = pytest.mark.distributed

TIERS = "3.0,4.0,6.0"
FLAGS = [
    "--recipe",
    "demo",
    "--bpw",
    TIERS,
    "--rows",
    "8",
    "--measure-rows",
    "4",
    "--length",
    "128",
]  # the demo recipe, smaller
REPO = Path(__file__).parents[2]


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and ".work" not in p.parts)


def _same_bytes(a: Path, b: Path) -> None:
    assert _files(a) == _files(b) and len(_files(a)) > 10
    different = [str(f) for f in _files(a) if not filecmp.cmp(a / f, b / f, shallow=False)]
    assert different == []


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo model and its tiers quantized by one process with one thread (what each worker uses)."""
    root = tmp_path_factory.mktemp("distributed")
    source = write_demo_model(root / "demo")
    args = [sys.executable, "-m", "cli", "quantize", str(source), str(root / "one"), *FLAGS, "--threads", "1"]
    subprocess.run(args, cwd=REPO, capture_output=True, timeout=600, check=True)
    return source, root / "one"


def _cli(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cli", "quantize", str(source), str(out), *FLAGS, "--workers", "2", "--threads", "1"]


def test_two_workers_write_the_bytes_of_one_process(one_process: tuple[Path, Path], tmp_path: Path) -> None:
    source, reference = one_process
    result = subprocess.run(
        _cli(source, tmp_path / "two"), cwd=REPO, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "worker 2" in result.stdout + result.stderr  # progress names the worker that finished each task
    _same_bytes(reference, tmp_path / "two")


def _processes(marker: bytes) -> list[int]:
    """PIDs of the processes whose command line holds `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _ray_workers() -> list[int]:
    """PIDs of Ray actor processes running our task runner."""
    return _processes(b"_RayTaskRunner")


@pytest.fixture
def ray_cluster() -> Iterator[tuple[str, dict[str, str]]]:
    """A two-CPU Ray cluster started as a user starts one (`ray start --head`), stopped afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # a short temp dir: Ray's sockets live there and a Unix socket path holds 107 bytes at most
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-", dir="/tmp")}
    ray = Path(sys.executable).with_name("ray")
    subprocess.run(
        [
            str(ray),
            "start",
            "--head",
            "--num-cpus",
            "2",
            "--port",
            str(port),
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"127.0.0.1:{port}", env
    finally:
        # not `ray stop`, which stops every Ray cluster of this user on the machine: only this one's processes
        for pid in _processes(env["RAY_TMPDIR"].encode()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def test_on_a_ray_cluster_a_worker_killed_mid_job_is_restarted_and_the_bytes_stay(
    one_process: tuple[Path, Path], tmp_path: Path, ray_cluster: tuple[str, dict]
) -> None:
    """`--ray ADDRESS --workers 2` on a cluster of 2: a worker killed with SIGKILL while the tiers run
    is restarted by Ray and its task run again; the output is byte for byte the one-process one."""
    source, reference = one_process
    address, env = ray_cluster
    out = tmp_path / "killed"
    job = subprocess.Popen(
        _cli(source, out) + ["--ray", address],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines, killed = [], None
    assert job.stdout is not None
    for line in job.stdout:
        lines.append(line)
        if killed is None and "quantize" in line and "worker" in line:  # the tiers' stage is running on both workers
            workers = _ray_workers()
            if workers:
                killed = workers[0]
                os.kill(killed, signal.SIGKILL)
    assert job.wait(timeout=600) == 0, "".join(lines)
    assert killed is not None, "".join(lines)
    _same_bytes(reference, out)


def test_workers_without_ray_say_how_to_install_it(
    one_process: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, _ = one_process
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    started = time.monotonic()
    result = CliRunner().invoke(
        app, ["quantize", str(source), str(tmp_path / "out"), "--recipe", "demo", "--bpw", "4.0", "--workers", "2"]
    )
    assert (
        result.exit_code == 2
        and 'pip install -e ".[distributed]"' in result.output
        and "Traceback" not in result.output
    )
    assert time.monotonic() - started < 30 and not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("", "--ray: expected host:port"),
        ("nonsense", "--ray: expected host:port"),
        ("127.0.0.1:9", "no Ray cluster answers there"),
    ],
)
def test_a_bad_cluster_address_fails_in_seconds_before_any_work(
    one_process: tuple[Path, Path], tmp_path: Path, address: str, message: str
) -> None:
    source, _ = one_process
    started = time.monotonic()
    result = CliRunner().invoke(
        app, ["quantize", str(source), str(tmp_path / "out"), "--recipe", "demo", "--bpw", "4.0", "--ray", address]
    )
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert time.monotonic() - started < 30 and not (tmp_path / "out").exists()
