"""The measurement: for every decoder linear, the error of each anchor layout, and measurement.json.

A linear's anchors (candidates.py) are quantized with GPTQ and their block-output error measured
with only that linear quantized. Two shortcuts make it cheaper without changing a number:
  * a mix that starts with the high width continues the pure high-width run from its snapshot at
    the last shared group boundary (GPTQ's first rows do not depend on the later ones);
  * for o_proj and down_proj, whose output goes straight into the residual, the block error is
    exactly tokens · tr(ΔW H ΔWᵀ): no forward pass needed.
Errors are relative squared errors of the block output, tokens weighted as the Hessians are.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from runtime.errors import UserError
from runtime.exl2_format import pad_columns, storage_bits
from runtime.model import load_layer
from runtime.outputs import atomic_write_json
from runtime.progress import Progress
from runtime.text import DECODER_LINEARS, layer_prefix
from runtime.version import VERSION
from runtime.weights import Checkpoint

from .block import BLOCKS, RESIDUAL_LINEARS, BlockRunner, block_specs, energy
from .candidates import GROUP_ROWS, Candidate, anchor_candidates, linear_shapes
from .compute import Compute
from .gptq import GPTQResult, PreparedHessian, gptq_quantize, output_error, prepare_hessian
from .job import MEASUREMENT_FILE, JobContext, JobState, save_state
from .streams import current_location, next_location

MEASUREMENT_FORMAT = "pixtral-exl2-measurement"
MEASUREMENT_VERSION = 1
PARTIAL_MEASUREMENT = "measurement.partial.json"  # in the work directory, grown block by block
QUANTIZER_VERSION = f"pixtral-exl2 {VERSION}"  # written into measurement.json and each tier's config


class MeasurementError(UserError):
    """A measurement file that does not fit the model or is not a measurement."""


@dataclass(frozen=True)
class AnchorResult:
    candidate: Candidate
    bits: int  # storage cost (spec §3.2)
    error: float  # squared relative error of the block output with only this linear quantized


@dataclass(frozen=True)
class LinearMeasurement:
    rows: int  # K
    columns: int  # N' (padded)
    anchors: tuple[AnchorResult, ...]


def anchor_runs(W: Tensor, Hp: PreparedHessian, rows: int, compute: Compute) -> Iterator[tuple[Candidate, GPTQResult]]:
    """GPTQ of every anchor of a linear with `rows` inputs; each pure width first, then the mixes
    that start with it, continued from its snapshot (legacy: every anchor from scratch)."""
    candidates = anchor_candidates(rows)
    if compute.legacy:
        for candidate in candidates:
            yield candidate, gptq_quantize(W, Hp, candidate.plan(rows), group=compute.group)
        return
    pure = {c.lo if c.hi_rows == 0 else c.hi: c for c in candidates if c.hi_rows in (0, rows)}
    mixes: dict[int, list[Candidate]] = {}
    for c in candidates:
        if 0 < c.hi_rows < rows:
            mixes.setdefault(c.hi, []).append(c)
    for width in sorted(pure, reverse=True):
        step = GROUP_ROWS[width]
        starts = {c.hi_rows // step * step for c in mixes.get(width, [])} - {0}
        base = gptq_quantize(W, Hp, pure[width].plan(rows), group=compute.group, snapshot_rows=starts)
        yield pure[width], base
        for mix in mixes.get(width, []):
            snapshot = base.snapshots.get(mix.hi_rows // step * step)
            yield mix, gptq_quantize(W, Hp, mix.plan(rows), group=compute.group, start=snapshot)


def measure_block(
    runner: BlockRunner, block: str, states: Sequence[Tensor], tick: Callable[[], None] = lambda: None,
    weights: Sequence[Tensor] | None = None,
) -> tuple[dict[str, list[AnchorResult]], list[Tensor]]:  # fmt: skip
    """Every anchor of every linear of the block; returns the results per linear and the block's
    fp16 outputs (the next block's input, on the CPU)."""
    compute = runner.compute
    on_device = compute.device.type != "cpu"
    rows_in = runner.resident(states) if on_device else list(states)
    accumulators, reference = runner.hessians(block, rows_in, weights, on_device)
    total = energy(reference, weights)
    prepared = {group: prepare_hessian(acc.result(), compute.damp) for group, acc in accumulators.items()}
    results: dict[str, list[AnchorResult]] = {}
    for spec in block_specs(block):
        original = runner.layer.get_submodule(spec.name).weight.data.clone()
        K, columns = original.shape[1], pad_columns(original.shape[0])
        accumulator, weight = accumulators[spec.hessian_group], original.float()
        exact = spec.name in RESIDUAL_LINEARS and not compute.legacy
        H_mean = accumulator.result() if exact else None  # once per linear: K² work (down_proj: 14336²)
        found = []
        for candidate, result in anchor_runs(weight, prepared[spec.hessian_group], K, compute):
            if H_mean is not None:
                error = output_error(weight, result.weight, H_mean, accumulator.tokens) / total
            else:
                runner.set_weight(spec.name, result.weight)
                error = runner.squared_error(block, rows_in, reference, weights) / total
            found.append(AnchorResult(candidate, storage_bits(candidate.plan(K), columns), error))
            tick()
        results[spec.name] = sorted(found, key=lambda a: a.candidate)
        runner.set_weight(spec.name, original)
    return results, [r.half().cpu() for r in reference]


def run_measure(ctx: JobContext, state: JobState) -> JobState:
    """MEASURE: every anchor of every linear, block by block on the fp16 stream of the measurement
    rows; a checkpoint after each block (its errors, and where the stream's rows are)."""
    if ctx.config.measurement is not None:
        return state
    count, blocks = ctx.config.calibration.measure_rows, 2 * ctx.layers
    weights = ctx.token_weights(count)
    partial_path = ctx.work / PARTIAL_MEASUREMENT
    partial = json.loads(partial_path.read_text()) if partial_path.is_file() else {}
    steps = sum(len(anchor_candidates(spec.shape(ctx.cfg.text)[1])) for spec in DECODER_LINEARS)
    done = itertools.count(state.blocks_done // 2 * steps + 1)
    runner = None
    with Checkpoint(ctx.config.model_dir) as ckpt:
        for index in range(state.blocks_done, blocks):
            layer, block = divmod(index, 2)
            if runner is None or block == 0:
                runner = BlockRunner(load_layer(ckpt, ctx.cfg, layer), ctx.cfg.text, ctx.config.calibration.length, ctx.compute)
            source = current_location(state.streams, "m")
            tick = lambda layer=layer: ctx.progress(Progress("measure", next(done), ctx.layers * steps, f"layer {layer + 1}/{ctx.layers}"))
            results, outputs = measure_block(runner, BLOCKS[block], list(ctx.store.rows(source, count)), tick, weights)
            target = next_location("m", source)
            for row, output in enumerate(outputs):
                ctx.store.write(target, row, output)
            partial.update({layer_prefix(layer) + name: anchors_to_json(anchors) for name, anchors in results.items()})
            atomic_write_json(partial_path, partial)
            state = replace(state, blocks_done=index + 1, streams={**state.streams, "m": target})
            save_state(ctx.work, state)
    shapes = linear_shapes(ctx.cfg)
    measurements = {name: LinearMeasurement(*shapes[name], anchors_from_json(entries)) for name, entries in partial.items()}
    atomic_write_json(Path(ctx.config.out_dir) / MEASUREMENT_FILE, measurement_to_json(measurements, _meta(ctx)))
    ctx.store.remove("m")
    return state


def _meta(ctx: JobContext) -> dict[str, Any]:
    spec = ctx.config.calibration
    return {"model": str(ctx.config.model_dir), "quantizer": QUANTIZER_VERSION,
            "calibration": {"rows": spec.measure_rows, "length": spec.length, "dataset": spec.dataset_name()}}  # fmt: skip


# --- measurement.json ------------------------------------------------------------------------


def anchors_to_json(anchors: Sequence[AnchorResult]) -> list[dict[str, Any]]:
    return [{"candidate": a.candidate.to_json(), "bits": a.bits, "error": a.error} for a in anchors]


def anchors_from_json(entries: list[dict[str, Any]]) -> tuple[AnchorResult, ...]:
    return tuple(AnchorResult(Candidate(*a["candidate"]), int(a["bits"]), float(a["error"])) for a in entries)


def measurement_to_json(measurements: dict[str, LinearMeasurement], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": MEASUREMENT_FORMAT,
        "version": MEASUREMENT_VERSION,
        **meta,
        "linears": {
            name: {"rows": m.rows, "columns": m.columns, "anchors": anchors_to_json(m.anchors)}
            for name, m in sorted(measurements.items())
        },
    }


def measurement_from_json(data: dict[str, Any], source: str) -> dict[str, LinearMeasurement]:
    if data.get("format") != MEASUREMENT_FORMAT:
        raise MeasurementError(f"{source}: not a pixtral-exl2 measurement")
    try:
        return {
            name: LinearMeasurement(int(entry["rows"]), int(entry["columns"]), anchors_from_json(entry["anchors"]))
            for name, entry in data["linears"].items()
        }
    except (KeyError, TypeError, ValueError) as err:
        raise MeasurementError(f"{source}: malformed measurement ({err})") from err


def load_measurement(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise MeasurementError(f"{path}: cannot read measurement ({err})") from err
