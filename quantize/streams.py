"""Persisting what a quantize job carries between layers: calibration rows and row hidden states.

States are saved in the dtype they are kept in (fp16), so a resumed job continues from exactly the
bits an uninterrupted one had. Files are written under a new name and only then referenced by the job
file; the previous generation is deleted afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from calibration.rows import CalibrationRow
from runtime.outputs import follow_umask


def save_rows(path: Path, rows: list[CalibrationRow]) -> None:
    tensors: dict[str, torch.Tensor] = {"input_ids": torch.stack([r.input_ids for r in rows])}
    owners = []
    for index, row in enumerate(rows):
        for pixels in row.images:
            tensors[f"image.{len(owners)}"] = torch.from_numpy(pixels.copy())
            owners.append(index)
    tensors["image_row"] = torch.tensor(owners, dtype=torch.int64)
    kinds = ",".join(r.kind for r in rows)
    _atomic_save(path, tensors, {"kinds": kinds})


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a file and its metadata, in one open."""
    with safe_open(str(path), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()


def load_rows(path: Path) -> list[CalibrationRow]:
    tensors, metadata = _load(path)
    kinds = metadata["kinds"].split(",")
    rows = [CalibrationRow(ids.clone(), [], kind) for ids, kind in zip(tensors["input_ids"], kinds)]
    for image_index, row_index in enumerate(tensors["image_row"].tolist()):
        rows[row_index].images.append(tensors[f"image.{image_index}"].numpy())
    return rows


def save_streams(path: Path, streams: dict[str, list[torch.Tensor]]) -> None:
    """Streams by name, each a list of per-row [L, hidden] fp16 tensors."""
    tensors = {f"{name}.{i}": state.contiguous() for name, states in streams.items() for i, state in enumerate(states)}
    _atomic_save(path, tensors, {"streams": ",".join(f"{name}:{len(states)}" for name, states in streams.items())})


def load_streams(path: Path) -> dict[str, list[torch.Tensor]]:
    tensors, metadata = _load(path)
    streams = {}
    for entry in filter(None, metadata["streams"].split(",")):
        name, count = entry.rsplit(":", 1)
        streams[name] = [tensors[f"{name}.{i}"] for i in range(int(count))]
    return streams


def _atomic_save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    save_file(tensors, str(tmp), metadata=metadata)
    follow_umask(tmp)
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    _atomic_save(path, tensors, {"format": "pt"})
