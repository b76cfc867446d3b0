"""The output guard every writing command goes through, and atomic writes.

Rules (one place, so every command keeps them):
  * an output may not be an input, lie inside one, or contain one;
  * an existing output is replaced only with `--force`, and only if it is a directory that
    pixtral-exl2 itself wrote (its marker file lists what it wrote) holding nothing else; a directory
    with anyone else's files is refused, never emptied;
  * a directory appears complete under its final name or not at all: it is built in a recognisable
    temporary sibling (`.NAME.pixtral-exl2-tmp-PID`) that the next run removes if its process died;
  * files follow the user's umask (safetensors alone would write them 0600).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pixtral.errors import UserError

MARKER = ".pixtral-exl2-output.json"
TMP_TAG, OLD_TAG = ".pixtral-exl2-tmp-", ".pixtral-exl2-old-"
SMALL_FILE = 1 << 20  # files up to this size get a hash in the marker
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.pixtral-exl2-(?:tmp|old)-(?P<pid>\d+)$")


class OutputError(UserError):
    """An output path that may not be written (exists, overlaps an input, or is not writable)."""


def check_outside_inputs(output: Path, inputs: Iterable[Path | None], label: str = "output") -> None:
    """Refuse an output equal to an input, inside one, or containing one."""
    out = Path(output).resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        if out == src:
            raise OutputError(f"{output}: the {label} is the input {source}; choose another directory")
        if src in out.parents:
            raise OutputError(f"{output}: the {label} lies inside the input {source}; choose a directory outside it")
        if out in src.parents:
            raise OutputError(f"{output}: the {label} contains the input {source}; choose a directory that does not")


def read_marker(path: Path) -> dict[str, Any] | None:
    """What pixtral-exl2 recorded writing into directory `path`, or None if it did not write it."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("files"), list) else None


def check_replaceable(path: Path, force: bool, command: str, hint: str = "pass --force to replace it") -> None:
    """An existing `path` may be replaced only with `force`, and only if it holds just what `command` wrote."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if not force:
        raise OutputError(f"{path}: already exists; {hint}")
    if not path.is_dir() or path.is_symlink():
        raise OutputError(f"{path}: exists and is not a directory pixtral-exl2 wrote; refusing to replace it")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    marker = read_marker(path)
    if marker is not None and marker.get("command") != command:
        raise OutputError(
            f"{path}: was written by `pixtral-exl2 {marker.get('command')}`, not `{command}`; "
            "refusing to replace it. Choose another directory"
        )
    foreign = [e for e in entries if e != MARKER and (marker is None or e not in marker["files"])]
    if foreign:
        shown = ", ".join(repr(e) for e in foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(
            f"{path}: holds files pixtral-exl2 did not write ({shown}); --force only replaces "
            "pixtral-exl2's own output. Move them away or choose another directory"
        )


def check_writable(path: Path) -> None:
    """The nearest existing ancestor of `path` must be a directory we may create entries in."""
    ancestor = Path(path).absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{path}: cannot be created, {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: cannot be created, permission denied in {ancestor}")


def check_output(path: Path, force: bool, command: str, inputs: Iterable[Path | None] = ()) -> None:
    """Every check an output directory needs before any work starts."""
    check_outside_inputs(path, inputs)
    check_replaceable(path, force, command)
    check_writable(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def clean_leftovers(parent: Path, name: str) -> list[Path]:
    """Remove temporaries for `name` in `parent` left by runs that were killed; return them."""
    removed = []
    if not parent.is_dir():
        return removed
    for entry in parent.iterdir():
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == name and int(match["pid"]) != os.getpid() and not _pid_alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink(
                missing_ok=True
            )
            removed.append(entry)
    return removed


def _make_parents(path: Path) -> list[Path]:
    """mkdir -p, returning the directories it created (deepest last), so a failure can undo them."""
    created = []
    for ancestor in reversed(path.parents):
        if not ancestor.exists():
            ancestor.mkdir()
            created.append(ancestor)
    return created


@contextmanager
def atomic_directory(
    final: str | Path, force: bool, command: str, inputs: Iterable[Path | None] = ()
) -> Iterator[Path]:
    """Yield a temporary sibling directory; it becomes `final` only if the block succeeds.

    The existing `final` (with `force`) is moved aside only once the new one is complete, then removed.
    """
    final = Path(final)
    check_output(final, force, command, inputs)
    created = _make_parents(final)
    clean_leftovers(final.parent, final.name)
    tmp = final.parent / f".{final.name}{TMP_TAG}{os.getpid()}"
    try:
        try:
            tmp.mkdir()
        except OSError as err:  # name the output the user asked for, not our temporary
            raise OutputError(f"{final}: cannot be created ({err.strerror or err})") from None
        yield tmp
        write_json(tmp / MARKER, _marker(tmp, command))
        old = final.parent / f".{final.name}{OLD_TAG}{os.getpid()}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in reversed(created):
            if directory.exists() and not any(directory.iterdir()):
                directory.rmdir()
        raise


def _marker(directory: Path, command: str) -> dict[str, Any]:
    """What we wrote into `directory`: its files, and the hashes of the small ones we may rewrite later
    (a card), so a later run can tell our file from one the user edited."""
    files = sorted({p.name for p in directory.iterdir()} | {MARKER})
    small = {
        p.name: _sha256(p)
        for p in directory.iterdir()
        if p.is_file() and p.name != MARKER and p.stat().st_size <= SMALL_FILE
    }
    return {"written_by": "pixtral-exl2", "command": command, "files": files, "sha256": dict(sorted(small.items()))}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def update_owned_files(directory: Path, files: dict[str, bytes], force: bool = False) -> None:
    """Write `files` into a directory pixtral-exl2 wrote (its marker updated): a file we did not write,
    or one changed since we wrote it, is only replaced with `force`."""
    directory = Path(directory)
    marker = read_marker(directory)
    if marker is None:
        raise OutputError(f"{directory}: not written by pixtral-exl2 (no {MARKER}); not touching it")
    hashes = marker.get("sha256") or {}
    for name, data in files.items():
        path = directory / name
        if path.exists() and not force and hashes.get(name) != _sha256(path):
            raise OutputError(
                f"{path}: changed since pixtral-exl2 wrote it (or not written by it); pass --force to replace it"
            )
    for name, data in files.items():
        atomic_write_bytes(directory / name, data)
        hashes[name] = hashlib.sha256(data).hexdigest()
    marker["files"] = sorted(set(marker["files"]) | set(files))
    marker["sha256"] = dict(sorted(hashes.items()))
    atomic_write_json(directory / MARKER, marker)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file by rename, so a crash leaves the old version or the new one, never half."""
    path = Path(path)
    clean_leftovers(path.parent, path.name)
    tmp = path.parent / f".{path.name}{TMP_TAG}{os.getpid()}"
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, value: Any) -> None:
    atomic_write_bytes(path, (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def write_json(path: str | Path, value: Any) -> None:
    Path(path).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give a file written by a library with a fixed 0600 mode the permissions `open()` would have."""
    os.chmod(path, 0o666 & ~umask())
