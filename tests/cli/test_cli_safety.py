"""The command line's safety contract, as a careless user meets it: nothing lost, no tracebacks.

Every case records the file system before and after: an output may not be an input, lie inside one
or contain one; `--force` replaces only pixtral-exl2's own output; bad options and files give one
line and exit 2; a killed run leaves temporaries that the next run removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import PARAMS, write_native
from typer.testing import CliRunner

from cli import app
from pixtral.outputs import MARKER

runner = CliRunner()
REPO = Path(__file__).parents[2]
FAST = ["--bpw", "4.0", "--rows", "4", "--measure-rows", "2", "--length", "64", "--text-only", "--skip-weight-check"]


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and folder under `root` (hidden ones too): content hash and mode."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        out[key] = (hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir", path.stat().st_mode)
    return out


def invoke(*args: object):
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def expect_refusal(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and len(result.output.strip().splitlines()) <= 3, result.output
    for needle in needles:
        assert needle in result.output, result.output


@pytest.fixture()
def native(tmp_path: Path) -> Path:
    return write_native(tmp_path / "native", PARAMS, "spm", bias=False)


@pytest.fixture()
def model(tiny_spm_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_spm_model, tmp_path / "model"))


def _user_folder(path: Path) -> Path:
    """A folder with someone's own files in it."""
    (path / "mine").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "mine" / "photo.bin").write_bytes(os.urandom(64))
    return path


# --- outputs that overlap their input ----------------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_convert_never_writes_over_its_input(native: Path, tmp_path: Path, where: str, force: bool) -> None:
    dst = {"same": native, "inside": native / "hf", "contains": tmp_path}[where]
    before = snapshot(tmp_path)
    result = invoke("convert", native, dst, *(["--force"] if force else []))
    expect_refusal(result, "input" if where != "same" or force else "")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_quantize_never_writes_over_its_input(model: Path, tmp_path: Path, where: str) -> None:
    out = {"same": model, "inside": model / "exl2", "contains": tmp_path}[where]
    before = snapshot(tmp_path)
    expect_refusal(invoke("quantize", model, out, *FAST, "--force"), "input")
    assert snapshot(tmp_path) == before


def test_quantize_sources_may_not_sit_where_it_writes(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "4.0bpw").mkdir(parents=True)
    (out / "4.0bpw" / "calibration.txt").write_text("text " * 1000)
    before = snapshot(tmp_path)
    result = invoke("quantize", model, out, *FAST, "--force", "--calibration-text", out / "4.0bpw" / "calibration.txt")
    expect_refusal(result, "input")
    assert snapshot(tmp_path) == before


# --- --force replaces only pixtral-exl2's own output -------------------------------------------


def test_convert_force_refuses_a_folder_with_other_files(native: Path, tmp_path: Path) -> None:
    dst = _user_folder(tmp_path / "dst")
    before = snapshot(tmp_path)
    expect_refusal(invoke("convert", native, dst, "--force"), "did not write", "notes.txt")
    assert snapshot(tmp_path) == before


def test_demo_model_force_refuses_a_folder_with_other_files(tmp_path: Path) -> None:
    dst = _user_folder(tmp_path / "demo")
    before = snapshot(tmp_path)
    expect_refusal(invoke("demo-model", dst, "--force"), "did not write")
    assert snapshot(tmp_path) == before


def test_force_replaces_our_own_output_but_not_a_file_added_to_it(native: Path, tmp_path: Path) -> None:
    dst = tmp_path / "hf"
    assert invoke("convert", native, dst).exit_code == 0
    assert json.loads((dst / MARKER).read_text())["command"] == "convert"
    assert invoke("convert", native, dst, "--force").exit_code == 0  # ours: replaced
    (dst / "README.md").write_text("my card")
    before = snapshot(tmp_path)
    expect_refusal(invoke("convert", native, dst, "--force"), "README.md")
    assert snapshot(tmp_path) == before


def test_quantize_force_keeps_unrelated_files(model: Path, tmp_path: Path) -> None:
    out = _user_folder(tmp_path / "out")
    mine = {k: v for k, v in snapshot(out).items()}
    result = invoke("quantize", model, out, *FAST, "--force")
    assert result.exit_code == 0, result.output
    after = snapshot(out)
    assert all(after[k] == v for k, v in mine.items())
    assert (out / "4.0bpw" / "config.json").is_file() and (out / "measurement.json").is_file()


def test_quantize_force_refuses_a_tier_folder_it_did_not_write(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _user_folder(out / "4.0bpw")
    before = snapshot(tmp_path)
    expect_refusal(invoke("quantize", model, out, *FAST, "--force"), "did not write")
    assert snapshot(tmp_path) == before


# --- killed and interrupted runs ---------------------------------------------------------------


def test_kill_during_convert_leaves_a_temporary_the_next_run_removes(native: Path, tmp_path: Path) -> None:
    dst = tmp_path / "hf"
    code = textwrap.dedent(f"""
        import os
        from convert.mistral import convert
        convert({str(native)!r}, {str(dst)!r}, progress=lambda done, total: os._exit(9))
    """)
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 9
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".hf.pixtral-exl2-tmp-")]
    assert leftovers and not dst.exists()
    assert invoke("convert", native, dst).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "native"]


def test_ctrl_c_during_convert_says_so_and_keeps_nothing(
    native: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import convert.mistral as convert_module

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "permute_for_rope", interrupted)
    result = invoke("convert", native, tmp_path / "hf")
    assert result.exit_code == 130 and "interrupted" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        assert invoke("demo-model", tmp_path / "demo").exit_code == 0
    finally:
        os.umask(old)
    files = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "demo").rglob("*") if p.is_file()}
    folders = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "demo").rglob("*") if p.is_dir()}
    assert set(files.values()) == {0o640} and "examples" in folders and set(folders.values()) == {0o750}, (
        files,
        folders,
    )
    assert (tmp_path / "demo").stat().st_mode & 0o777 == 0o750


# --- options and files checked before any work -------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--length", "10000000"], "--length"), (["--image-fraction", "1.5"], "--image-fraction"),
     (["--shard-size", "0"], "--shard-size"),
     (["--rows", "0"], "--rows"), (["--measure-rows", "9"], "--measure-rows"), (["--seed", "-1"], "--seed"),
     (["--device", "tpu"], "--device"), (["--head-bits", "7"], "--head-bits"), (["--bpw", "9"], "--bpw"),
     (["--bpw", "4,4.0"], "more than once"), (["--recipe", "nope"], "recipe 'nope'"), (["--bpw", ""], "no tier given"),
     (["--bpw", " , "], "no tier given"), (["--resume", "--force"], "contradict")],
)  # fmt: skip
def test_quantize_options_are_checked_before_any_work(
    model: Path, tmp_path: Path, flags: list[str], needle: str
) -> None:
    out = tmp_path / "out"
    expect_refusal(invoke("quantize", model, out, *[f for f in FAST if f != "--text-only"], *flags), needle)
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_quantize_on_a_missing_gpu(model: Path, tmp_path: Path) -> None:
    expect_refusal(invoke("quantize", model, tmp_path / "out", *FAST, "--device", "cuda"), "no CUDA GPU")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ("[calibration]\nrowz = 5\n", "rowz"),
        ('[calibration]\nrows = "many"\n', "--rows"),
        ('bpw = "4"\n', "bpw must be a list"),
    ],
)
def test_bad_recipe_fields(model: Path, tmp_path: Path, table: str, needle: str) -> None:
    recipe = tmp_path / "mine.toml"
    recipe.write_text(table)
    expect_refusal(invoke("quantize", model, tmp_path / "out", "--recipe", recipe), needle)


def test_a_non_image_among_calibration_images(model: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_text("not a picture")
    (images / "metadata.jsonl").write_text('{"file_name": "a.jpg", "text": "a cat"}\n')
    out = tmp_path / "out"
    flags = [f for f in FAST if f != "--text-only"] + ["--image-fraction", "0.5", "--calibration-images", str(images)]
    expect_refusal(invoke("quantize", model, out, *flags), "a.jpg", "not a readable image")
    assert not out.exists()


@pytest.mark.parametrize("command", ["quantize", "convert", "demo-model"])
def test_an_output_that_cannot_be_created(model: Path, native: Path, tmp_path: Path, command: str) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    out = blocker / "out"
    args = {"quantize": [model, out, *FAST], "convert": [native, out], "demo-model": [out]}[command]
    expect_refusal(invoke(command, *args), "not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
@pytest.mark.parametrize("command", ["quantize", "convert", "demo-model"])
def test_an_output_in_a_read_only_folder(model: Path, native: Path, tmp_path: Path, command: str) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    args = {
        "quantize": [model, locked / "out", *FAST],
        "convert": [native, locked / "out"],
        "demo-model": [locked / "out"],
    }[command]
    expect_refusal(invoke(command, *args), "permission denied")
    assert not any(locked.iterdir())


def test_info_on_a_truncated_shard(model: Path) -> None:
    shard = sorted(model.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    expect_refusal(invoke("info", model), shard.name, "truncated")


def test_inspect_on_an_fp16_model(model: Path) -> None:
    expect_refusal(invoke("inspect", model), "not an EXL2 checkpoint")


def test_an_unexpected_error_names_a_saved_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.demo.model as demo_model

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(demo_model, "write_examples", broken)
    result = invoke("demo-model", tmp_path / "demo")
    assert result.exit_code == 1 and "internal error (RuntimeError: boom)" in result.output
    saved = Path(result.output.split("traceback saved to ")[1].split(";")[0].strip())
    assert "Traceback" in saved.read_text() and "boom" in saved.read_text()
    saved.unlink()


# --- what the flags and README promise ---------------------------------------------------------


def test_resume_needs_a_job(model: Path, tmp_path: Path) -> None:
    expect_refusal(invoke("quantize", model, tmp_path / "fresh", *FAST, "--resume"), "no job to resume")
    (tmp_path / "empty").mkdir()
    expect_refusal(invoke("quantize", model, tmp_path / "empty", *FAST, "--resume"), "no unfinished quantize job")


def test_a_reused_measurement_is_kept_in_out_and_the_head_bits_hold(model: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert invoke("quantize", model, first, *FAST, "--head-bits", "4").exit_code == 0
    result = invoke("quantize", model, second, *FAST, "--bpw", "3.0", "--measurement", first / "measurement.json")
    assert result.exit_code == 0, result.output
    assert (second / "measurement.json").read_bytes() == (first / "measurement.json").read_bytes()
    head_bpw = json.loads((first / "4.0bpw" / "config.json").read_text())["quantization_config"]["head_bpw"]
    assert 4.0 < head_bpw < 5.0  # --head-bits 4: mostly 4-bit rows plus scales, not an 8-bit head


def test_plain_progress_lines_without_a_terminal(model: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cli", "quantize", str(model), str(tmp_path / "out"), *FAST],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for stage in ("calibrate", "measure", "quantize", "compile"):
        assert f"] {stage}: done" in result.stdout, result.stdout


# --- every command's error paths: one line, exit 2, never a traceback ---------------------------


def test_every_command_fails_in_one_line(model: Path, native: Path, tmp_path: Path) -> None:
    not_pixtral = tmp_path / "llama"
    not_pixtral.mkdir()
    (not_pixtral / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{")
    missing = tmp_path / "missing"
    cases = [
        ["info", missing],
        ["info", not_pixtral],
        ["info", bad_json],
        ["info", native],
        ["inspect", missing],
        ["inspect", model],
        ["inspect", not_pixtral],
        ["demo-model", model],
        ["convert", missing, tmp_path / "x"],
        ["convert", model, tmp_path / "x"],
        ["convert", native, tmp_path / "x", "--dtype", "int4"],
        ["convert", native, tmp_path / "x", "--shard-size", "0"],
        ["quantize", missing, tmp_path / "x"],
        ["quantize", not_pixtral, tmp_path / "x"],
        ["quantize", model, tmp_path / "x", "--bpw", "four"],
        ["quantize", model, model],
        ["quantize", model, tmp_path / "x", *FAST, "--measurement", missing],
        ["quantize", model, tmp_path / "x", *FAST, "--calibration-text", missing],
    ]
    for case in cases:
        result = invoke(*case)
        assert result.exit_code == 2, (case, result.output)
        assert "error" in result.output.lower(), (case, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-json", "llama", "model", "native"]


def test_resume_mismatch_names_only_what_changed() -> None:
    from quantize.job import describe_mismatch

    saved = {"tiers": [4.0], "calibration": {"text_sources": [], "rows": 8}}  # as read back from job.json
    current = {"tiers": (3.0,), "calibration": {"text_sources": (), "rows": 8}}
    assert describe_mismatch(saved, current) == "tiers: [4.0] then, [3.0] now"


def test_force_does_not_replace_another_commands_output(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke("quantize", model, out, *FAST).exit_code == 0
    before = snapshot(tmp_path)
    expect_refusal(invoke("demo-model", out / "4.0bpw", "--force"), "written by `pixtral-exl2 quantize`")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "args",
    [["quantize", "MODEL", "OUT", "--length", "abc"], ["chat", "MODEL", "--temperature", "-1"],
     ["serve", "--port", "0"], ["eval", "MODEL", "MODEL", "--samples", "3"], ["quantize", "MODEL"], ["nosuch"]],
)  # fmt: skip
def test_option_values_the_parser_refuses_fail_in_one_line(model: Path, tmp_path: Path, args: list[str]) -> None:
    result = invoke(*[model if a == "MODEL" else tmp_path / "out" if a == "OUT" else a for a in args])
    assert (
        result.exit_code == 2 and result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    ), result.output
    assert "--help" in result.output and "╭" not in result.output


def test_sigterm_during_quantize_keeps_the_job_and_says_how_to_resume(model: Path, tmp_path: Path) -> None:
    import signal
    import time

    out = tmp_path / "out"
    command = [sys.executable, "-m", "cli", "quantize", str(model), str(out), *FAST]
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (out / ".work").exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=120)
    if job.returncode == 0:
        pytest.skip("the job finished before the signal arrived")
    assert job.returncode == 143 and "terminated" in output and "--resume" in output, output
    resumed = invoke("quantize", model, out, *FAST, "--resume")
    assert resumed.exit_code == 0, resumed.output


def test_version_is_the_packages(tmp_path: Path) -> None:
    from importlib.metadata import version

    from quantize.measure import QUANTIZER_VERSION

    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"pixtral-exl2 {version('pixtral-exl2')}"
    assert QUANTIZER_VERSION == result.output.strip()  # what measurement.json and the cards record


def test_threads_sets_torchs_intra_op_threads(model: Path, tmp_path: Path) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        assert invoke("quantize", model, tmp_path / "out", *FAST, "--threads", "1").exit_code == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    expect_refusal(invoke("eval", model, tmp_path / "out", "--threads", "0"), "--threads")


def test_a_quantize_output_folder_says_pick_a_tier(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert invoke("quantize", model, out, *FAST).exit_code == 0
    for command in ("info", "inspect", "chat"):
        expect_refusal(invoke(command, out), "quantize output folder", f"pick a tier, e.g. {out / '4.0bpw'}")


def test_chat_refuses_a_bad_picture_before_loading_the_model(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import runtime.backends

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the picture was checked")

    monkeypatch.setattr(runtime.backends, "load_backend", never)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello")
    expect_refusal(invoke("chat", model, "--image", not_an_image), "notes.png", "not a readable image")


def test_an_output_the_system_refuses_is_named_not_our_temporary() -> None:
    result = invoke("demo-model", "/proc/pixtral-exl2-test")  # /proc takes no new folders, even for root
    expect_refusal(result, "/proc/pixtral-exl2-test: cannot be created")
    assert "tmp" not in result.output


def test_force_into_a_larger_output_says_it_is_a_mix_of_two_jobs(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    flags = [f for f in FAST if f not in ("--bpw", "4.0")]
    assert invoke("quantize", model, out, *flags, "--bpw", "3.0,4.0").exit_code == 0
    result = invoke("quantize", model, out, *flags, "--bpw", "4.0", "--force")
    assert result.exit_code == 0 and "also holds 3.0bpw from an earlier job" in " ".join(result.output.split())
