"""Checks that run before any long work: bad input fails in seconds, with a message naming the cause."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from runtime.atomic import OutputExistsError
from runtime.config import PixtralConfig, load_config
from runtime.text import DECODER_LINEARS, layer_prefix
from runtime.tokenizer import PixtralTokenizer
from runtime.weights import Checkpoint, WeightsError

from .exl2_format import pad_columns
from .job import QuantizeConfig, load_state
from .options import HEAD_OPTIONS
from .strategy import MeasurementError, load_measurement, measurement_from_json, minimum_bpw
from .strategy_exllamav2 import is_exllamav2_measurement

FLOAT_DTYPES = {"F16", "BF16", "F32"}
MAX_BPW = 8.0


def linear_shapes(cfg: PixtralConfig) -> dict[str, tuple[int, int]]:
    """(rows K, padded columns N') of every decoder layer linear, by tensor prefix."""
    shapes = {}
    for index in range(cfg.text.num_hidden_layers):
        for spec in DECODER_LINEARS:
            out_features, in_features = spec.shape(cfg.text)
            shapes[layer_prefix(index) + spec.name] = (in_features, pad_columns(out_features))
    return shapes


def check_model(model_dir: Path, check_values: bool, tick: Callable[[int, int], None] = lambda d, t: None) -> PixtralConfig:
    """Config, tokenizer, one float dtype throughout, every tensor present, and (optionally) no NaN/inf."""
    cfg = load_config(model_dir)
    PixtralTokenizer(model_dir)
    with Checkpoint(model_dir) as ckpt:
        names = ckpt.names()
        if any(n.endswith(".q_weight") for n in names):
            raise WeightsError(f"{model_dir}: already EXL2-quantized; quantize the fp16/bf16 source model")
        dtypes: dict[str, str] = {}
        for name in names:
            dtypes.setdefault(ckpt.dtype(name), name)
        floats = {d: n for d, n in dtypes.items() if d in FLOAT_DTYPES}
        if len(floats) > 1:
            listing = ", ".join(f"{d} (e.g. {n})" for d, n in sorted(floats.items()))
            raise WeightsError(f"{model_dir}: mixed float dtypes {listing}; expected one dtype for the whole checkpoint")
        for prefix, (rows, _) in linear_shapes(cfg).items():
            if prefix + ".weight" not in ckpt:
                raise WeightsError(f"{model_dir}: tensor {prefix}.weight missing (needed by config.json)")
            if ckpt.shape(prefix + ".weight")[1] != rows:
                raise WeightsError(f"{ckpt.shard_of(prefix + '.weight')}: {prefix}.weight has {ckpt.shape(prefix + '.weight')[1]} inputs, config says {rows}")
        if check_values:
            for done, name in enumerate(names, start=1):
                tensor = ckpt.get(name)
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise WeightsError(f"{ckpt.shard_of(name)}: tensor {name} contains NaN or inf values")
                tick(done, len(names))
    return cfg


def check_plan(config: QuantizeConfig, cfg: PixtralConfig) -> None:
    """Tiers reachable for these shapes, valid head bits, and an output directory we may write."""
    if not config.tiers:
        raise ValueError("no target bpw given (--bpw 4.0, or a list such as 2.5,3.0,4.0)")
    if config.head_bits not in HEAD_OPTIONS:
        raise ValueError(f"--head-bits must be one of {sorted(HEAD_OPTIONS)}, got {config.head_bits}")
    shapes = linear_shapes(cfg)
    lowest = minimum_bpw(shapes)
    for bpw in config.tiers:
        if not lowest <= bpw <= MAX_BPW:
            raise ValueError(f"target {bpw} bpw is outside what EXL2 reaches for this model ({lowest:.3f} to {MAX_BPW})")
    if config.measurement is not None:
        check_measurement(Path(config.measurement), shapes)
    out_dir = Path(config.out_dir)
    if out_dir.exists() and not (config.resume or config.force):
        raise OutputExistsError(f"{out_dir}: already exists; pass --resume to continue a job there, or --force to start over")
    if config.resume and not config.force and out_dir.exists() and load_state(config.work_dir) is None:
        finished = [p.name for p in out_dir.iterdir() if p.is_dir() and p.name.endswith("bpw")]
        if not finished and any(out_dir.iterdir()):
            raise OutputExistsError(f"{out_dir}: exists but holds no quantize job to resume; pass --force to start over")


def check_measurement(path: Path, shapes: dict[str, tuple[int, int]]) -> None:
    """A reused measurement must cover every linear (ours) or block (exllamav2's) of this model."""
    data = load_measurement(path)
    if is_exllamav2_measurement(data):
        blocks = sorted({prefix.rpartition(".")[0] for prefix in shapes})
        missing = [b for b in blocks if not data["measurement"].get(b)]
        if missing:
            raise MeasurementError(f"{path}: no measurement for {missing[0]} ({len(missing)} blocks missing); it belongs to another model")
        return
    measurements = measurement_from_json(data, str(path))
    for name, (rows, columns) in shapes.items():
        m = measurements.get(name)
        if m is None or (m.rows, m.columns) != (rows, columns):
            raise MeasurementError(f"{path}: no measurement for {name} with shape {rows}×{columns}; it belongs to another model")
