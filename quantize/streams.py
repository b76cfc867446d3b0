"""What a quantize job carries between layers: the calibration rows, and the row states of every
stream (the measurement's, the fp16 reference, one per tier) on disk, not in memory.

Each stream is two files of fixed-size fp16 records, one per calibration row ([length, hidden]).
A block reads its rows from the stream's current buffer and writes its outputs into the other, so
a kill in the middle of a block leaves that block's input intact; the job file then says which
buffer is current (rows are written before the job file names them). A save point therefore writes
nothing but the job file, and the process holds one row at a time: its memory does not grow with
rows, length or tiers (the operating system's page cache keeps recent rows in free RAM).
Disk: 2 · rows · length · hidden · 2 bytes per stream (see `disk_bytes`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from calibration.rows import CalibrationRow
from pixtral.outputs import follow_umask

# the streams; a tier's stream is named by its tier (e.g. "4.0bpw")
EMBED = "embed"  # the decoder inputs, written once; every stream starts from it
MEASURED = "m"  # the measurement's rows, through the fp16 blocks
REFERENCE = "ref"  # the fp16 reference the tiers' GPTQ targets and heads are scored against


@dataclass(frozen=True)
class Location:
    """One of a stream's two buffers: where a block reads its rows, or writes them."""

    stream: str
    buffer: int

    def __str__(self) -> str:  # as the job file records it: "stream:buffer"
        return f"{self.stream}:{self.buffer}"

    @staticmethod
    def parse(text: str) -> Location:
        stream, _, buffer = text.rpartition(":")
        return Location(stream, int(buffer))


EMBEDDED = Location(EMBED, 0)  # the one buffer the decoder inputs are written to


def save_rows(path: Path, rows: list[CalibrationRow]) -> None:
    tensors: dict[str, torch.Tensor] = {"input_ids": torch.stack([r.input_ids for r in rows])}
    owners = []
    for index, row in enumerate(rows):
        for pixels in row.images:
            tensors[f"image.{len(owners)}"] = torch.from_numpy(pixels.copy())
            owners.append(index)
    tensors["image_row"] = torch.tensor(owners, dtype=torch.int64)
    _atomic_save(path, tensors, {"kinds": ",".join(r.kind for r in rows)})


def load_rows(path: Path) -> list[CalibrationRow]:
    with safe_open(str(path), "pt") as handle:
        tensors, metadata = {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()
    kinds = metadata["kinds"].split(",")
    rows = [CalibrationRow(ids.clone(), [], kind) for ids, kind in zip(tensors["input_ids"], kinds)]
    for image_index, row_index in enumerate(tensors["image_row"].tolist()):
        rows[row_index].images.append(tensors[f"image.{image_index}"].numpy())
    return rows


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata=metadata)
    follow_umask(tmp)
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    _atomic_save(path, tensors, {"format": "pt"})


class RowStore:
    """Row states of named streams in `folder`, double-buffered (a Location names one buffer)."""

    def __init__(self, folder: Path, length: int, hidden: int):
        self.folder, self.shape = folder, (length, hidden)
        self.record = length * hidden * 2  # fp16 bytes per row
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, location: Location) -> Path:
        return self.folder / f"{location.stream}.{location.buffer}.bin"

    def read(self, location: Location, row: int) -> torch.Tensor:
        """Row `row` of the buffer at `location`, [length, hidden] fp16 on the CPU."""
        with open(self._path(location), "rb") as handle:
            data = os.pread(handle.fileno(), self.record, row * self.record)
        if len(data) != self.record:
            raise OSError(
                f"{self._path(location)}: row {row} is missing (a damaged work directory; start over with --force)"
            )
        return torch.from_numpy(np.frombuffer(data, dtype=np.float16).reshape(self.shape).copy())

    def rows(self, location: Location, count: int) -> Iterator[torch.Tensor]:
        for row in range(count):
            yield self.read(location, row)

    def write(self, location: Location, row: int, state: torch.Tensor) -> None:
        data = state.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()
        path = self._path(location)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            os.pwrite(descriptor, data, row * self.record)
        finally:
            os.close(descriptor)

    def remove(self, stream: str) -> None:
        for buffer in (0, 1):
            self._path(Location(stream, buffer)).unlink(missing_ok=True)


def current_location(streams: dict[str, Location], stream: str) -> Location:
    """Where a stream's rows are now (`streams` as the job state records them): `embed` until its first block."""
    return streams.get(stream, EMBEDDED)


def next_location(stream: str, current: Location) -> Location:
    """Where a stream's next block writes: its other buffer (its first one, when it reads `embed`)."""
    return Location(stream, 1 - current.buffer) if current.stream == stream else Location(stream, 0)


def disk_bytes(rows: int, reference_rows: int, tiers: int, length: int, hidden: int) -> int:
    """Peak disk of the row states: the embeddings, the reference stream (its rows: the measurement
    rows, or every row for asymmetric GPTQ) and every tier's, two buffers each (the measurement's
    stream is gone by then)."""
    record = length * hidden * 2
    return record * (rows + 2 * reference_rows + 2 * tiers * rows)
