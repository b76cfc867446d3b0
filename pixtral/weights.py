"""Lazy access to the tensors of a (possibly sharded) safetensors checkpoint.

Nothing is read until a tensor is asked for, so a caller can walk a 124B model one decoder layer at a
time. Names are normalised to the legacy HF Llava spelling that exllamav2 expects
(`language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*`, `multi_modal_projector.*`);
checkpoints saved by newer transformers (`model.language_model.*`, `lm_head.*`) are read too.
"""

from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from pixtral.errors import UserError
from pixtral.outputs import follow_umask

INDEX_NAME = "model.safetensors.index.json"

# newer transformers in-memory/on-disk prefixes -> the legacy names used throughout this project
_PREFIX_ALIASES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


class WeightsError(UserError):
    """A checkpoint that is missing files or tensors, or holds tensors of the wrong shape or type."""


def canonical_name(name: str) -> str:
    """Map any accepted tensor-name spelling to the legacy HF Llava name."""
    for alias, legacy in _PREFIX_ALIASES:
        if name.startswith(alias):
            return legacy + name[len(alias) :]
    return name


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file, checked against the file size (catches truncation)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_len = handle.read(8)
        if len(raw_len) < 8:
            raise WeightsError(f"{path}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > size - 8:
            raise WeightsError(f"{path}: truncated safetensors file (header length {header_len})")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise WeightsError(f"{path}: corrupt safetensors header ({err})") from err
    header.pop("__metadata__", None)
    data_len = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    if 8 + header_len + data_len > size:
        raise WeightsError(
            f"{path}: truncated safetensors file ({size} bytes, header promises {8 + header_len + data_len})"
        )
    return header


class Checkpoint:
    """The tensors of one model directory, read lazily by canonical name.

    Use as a context manager (or call `close()`): open shard handles are cached.
    """

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._files: dict[str, Path] = {}  # canonical name -> shard
        self._stored: dict[str, str] = {}  # canonical name -> name as stored
        self._meta: dict[str, tuple[str, tuple[int, ...]]] = {}  # canonical name -> (dtype, shape)
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}
        for shard in self._shard_paths():
            for stored, info in read_safetensors_header(shard).items():
                name = canonical_name(stored)
                self._files[name] = shard
                self._stored[name] = stored
                self._meta[name] = (info["dtype"], tuple(info["shape"]))

    def _shard_paths(self) -> list[Path]:
        index = self.model_dir / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise WeightsError(f"{index}: not a safetensors index ({err})") from err
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.model_dir / s).is_file()]
            if not missing:
                return [self.model_dir / s for s in shards]
            # exllamav2's compile copies the source index verbatim (spec pitfall 14): none of its shards
            # exist, and the real ones are not listed. That index is stale, not a missing shard.
            if len(missing) < len(shards) or not sorted(self.model_dir.glob("*.safetensors")):
                raise WeightsError(f"{index}: lists shard(s) that do not exist: {', '.join(missing)}")
        shards = sorted(self.model_dir.glob("*.safetensors"))
        if not shards:
            raise WeightsError(f"{self.model_dir}: no *.safetensors files (and no {INDEX_NAME})")
        return shards

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def names(self) -> list[str]:
        return list(self._files)

    def shard_of(self, name: str) -> Path:
        return self._files[self._require(name)]

    def dtype(self, name: str) -> str:
        """The safetensors dtype string (`F16`, `BF16`, ...)."""
        return self._meta[self._require(name)][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[self._require(name)][1]

    def _require(self, name: str) -> str:
        if name not in self._files:
            raise WeightsError(f"{self.model_dir}: tensor {name!r} not found in the checkpoint")
        return name

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Read one tensor; with `shape`, check it first and name the tensor if it differs."""
        if shape is not None and self.shape(name) != tuple(shape):
            raise WeightsError(
                f"{self.shard_of(name)}: tensor {name!r} has shape {list(self.shape(name))}, "
                f"expected {list(shape)} from config.json"
            )
        shard = self.shard_of(name)
        if shard not in self._handles:
            self._handles[shard] = self._stack.enter_context(safe_open(str(shard), framework="pt"))
        return self._handles[shard].get_tensor(self._stored[name])


def weights_bytes(model_dir: Path) -> int:
    """Size on disk of a model directory's safetensors files."""
    return sum(shard.stat().st_size for shard in Path(model_dir).glob("*.safetensors"))


def tensor_nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ShardWriter:
    """Write tensors into `{stem}-0000i-of-0000N.safetensors` shards plus an index, streaming.

    Tensors are buffered until the shard would pass `max_shard_bytes`, then written; so memory holds
    at most one shard. Names are known only at the end, so shards are renamed in `finish()`.
    """

    def __init__(self, out_dir: str | Path, stem: str, max_shard_bytes: int, index_name: str = INDEX_NAME):
        self.out_dir = Path(out_dir)
        self.stem = stem
        self.max_shard_bytes = max_shard_bytes
        self.index_name = index_name
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._written):
            raise WeightsError(f"tensor {name!r} written twice")
        size = tensor_nbytes(tensor)
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.out_dir / f".{self.stem}-part{len(self._written):05d}.safetensors"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        follow_umask(path)
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Flush, give the shards their final names, write the index; return the shard paths."""
        if self._pending or not self._written:
            self._flush()
        count = len(self._written)
        weight_map: dict[str, str] = {}
        final_paths = []
        for number, (path, names) in enumerate(self._written, start=1):
            final = self.out_dir / f"{self.stem}-{number:05d}-of-{count:05d}.safetensors"
            path.rename(final)
            final_paths.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / self.index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return final_paths
