"""Writing EXL2 checkpoints: streamed, sharded, atomic.

A checkpoint is the source model directory with each quantized linear's `weight` replaced by the
EXL2 tensors of pack.py; every other tensor (vision tower, projector, embeddings, norms) is
copied bit-identically in its source dtype, as exllamav2's compile step does for the vision parts
(../shared/spec/exl2-format.md §1.5, §4.7). Shards are `output-0000i-of-0000N.safetensors` with an
index; the source index and shards are never copied (pitfalls 13 and 14 of §7). The validating
reader is pixtral/exl2/checkpoint.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from pixtral.config import ConfigError, load_config, with_top_level_context
from pixtral.exl2.checkpoint import natural_key, validate_layer
from pixtral.exl2.format import FormatError
from pixtral.exl2.metadata import EXL2Metadata
from pixtral.outputs import atomic_directory, read_marker, write_json
from pixtral.weights import Checkpoint, ShardWriter

DEFAULT_SHARD_MB = 8192  # exllamav2's default
EXLLAMAV2_VERSION = "0.3.2"  # the loader these files are written for
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def copy_side_files(source_dir: Path, out_dir: Path) -> list[str]:
    """Copy every non-weight file of the source directory (tokenizer, templates, processor configs);
    hidden files (the source's output marker, editor or temp files) are not the model's."""
    copied = []
    for path in sorted(source_dir.iterdir()):
        if (
            path.is_file()
            and not path.name.startswith(".")
            and not path.name.endswith(WEIGHT_FILE_SUFFIXES)
            and path.name not in INDEX_FILES
        ):
            shutil.copy2(path, out_dir / path.name)
            copied.append(path.name)
    return copied


def write_exl2_checkpoint(
    out_dir: str | Path,
    source_dir: str | Path,
    quantized_prefixes: Iterable[str],
    load_quantized: Callable[[str], dict[str, torch.Tensor]],
    metadata: EXL2Metadata,
    shard_mb: int = DEFAULT_SHARD_MB,
    force: bool = False,
    extra_files: Callable[[Path], dict[str, bytes]] | None = None,
) -> Path:
    """Write a complete EXL2 model directory, atomically.

    `load_quantized(prefix)` returns that layer's EXL2 tensors by suffix; it is called once per
    layer while streaming, so only one layer and one shard are in memory at a time.
    """
    source_dir = Path(source_dir)
    pending = set(quantized_prefixes)
    with atomic_directory(out_dir, force, "quantize", [source_dir]) as tmp, Checkpoint(source_dir) as source:
        writer = ShardWriter(tmp, "output", shard_mb * 2**20)
        for name in sorted(source.names(), key=natural_key):
            prefix, _, leaf = name.rpartition(".")
            if prefix in pending and leaf == "weight":
                tensors = load_quantized(prefix)
                validate_layer(prefix, tensors)
                for suffix in sorted(tensors):
                    writer.add(f"{prefix}.{suffix}", tensors[suffix])
                pending.discard(prefix)
            elif prefix in pending and leaf == "bias":
                continue  # a quantized layer's bias travels with its EXL2 tensors (fp16, N' entries)
            else:
                writer.add(name, source.get(name))  # bit-identical, source dtype
        if pending:
            raise FormatError(f"{source_dir}: no source weight for quantized layer(s) {sorted(pending)[:3]}")
        writer.finish()
        copy_side_files(source_dir, tmp)
        config = with_top_level_context(json.loads((source_dir / "config.json").read_text(encoding="utf-8")))
        config["quantization_config"] = metadata.to_json()
        write_json(tmp / "config.json", config)
        extras = extra_files(tmp) if extra_files else {}  # e.g. the model card, which needs the shard sizes
        for name, data in extras.items():
            (tmp / name).write_bytes(data)
    return Path(out_dir)


def is_finished_tier(tier_dir: Path) -> bool:
    """A tier `write_exl2_checkpoint` finished: its directory complete (it appears whole, its output
    marker listing config.json) and config.json carrying EXL2 metadata."""
    marker = read_marker(tier_dir)
    if marker is None or "config.json" not in marker["files"]:
        return False
    try:
        return load_config(tier_dir).quantization is not None
    except ConfigError:
        return False
