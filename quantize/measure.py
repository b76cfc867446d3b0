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

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import Tensor

from pixtral.errors import UserError
from pixtral.exl2.format import pad_columns, storage_bits
from pixtral.outputs import atomic_write_json
from pixtral.progress import Progress
from pixtral.text import DECODER_LINEARS, layer_prefix
from pixtral.version import VERSION
from quantize.block import BLOCKS, RESIDUAL_LINEARS, BlockRunner, block_specs, energy
from quantize.candidates import GROUP_ROWS, Candidate, anchor_candidates, linear_shapes
from quantize.compute import Compute
from quantize.gptq import GPTQResult, PreparedHessian, gptq_quantize, output_error, prepare_hessian
from quantize.hessian import HessianAccumulator
from quantize.job import MEASUREMENT_FILE, JobContext, JobState, save_state
from quantize.parallel import MeasureLinear, StreamBlock, Task, Workers
from quantize.streams import MEASURED, current_location

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
    that start with it, continued from its snapshot."""
    candidates = anchor_candidates(rows)
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


@dataclass
class BlockInputs:
    """What every linear of a block is measured against: the rows (on the compute device for the many
    passes), the Hessians, the fp16 outputs and their energy."""

    rows: list[Tensor]
    accumulators: dict[str, HessianAccumulator]
    reference: list[Tensor]
    total: float
    weights: Sequence[Tensor] | None
    prepared: dict[str, PreparedHessian] = field(default_factory=dict)

    def hessian(self, group: str, damp: float) -> PreparedHessian:
        if group not in self.prepared:
            self.prepared[group] = prepare_hessian(self.accumulators[group].result(), damp)
        return self.prepared[group]


def block_inputs(
    runner: BlockRunner, block: str, states: Sequence[Tensor], weights: Sequence[Tensor] | None = None
) -> BlockInputs:
    """One pass of the block over the measurement rows: its Hessians and fp16 outputs."""
    on_device = runner.compute.device.type != "cpu"
    rows_in = runner.resident(states) if on_device else list(states)
    accumulators, reference = runner.hessians(block, rows_in, weights, on_device)
    return BlockInputs(rows_in, accumulators, reference, energy(reference, weights), weights)


def measure_linear(runner: BlockRunner, block: str, name: str, inputs: BlockInputs) -> list[AnchorResult]:
    """Every anchor of one linear, with only that linear quantized; the runner's layer is left as it was."""
    spec = next(s for s in block_specs(block) if s.name == name)
    original = runner.layer.get_submodule(name).weight.data.clone()
    K, columns = original.shape[1], pad_columns(original.shape[0])
    accumulator, weight = inputs.accumulators[spec.hessian_group], original.float()
    H_mean = accumulator.result() if name in RESIDUAL_LINEARS else None  # once per linear: K² work (down_proj: 14336²)
    found = []
    for candidate, result in anchor_runs(
        weight, inputs.hessian(spec.hessian_group, runner.compute.damp), K, runner.compute
    ):
        if H_mean is not None:
            error = output_error(weight, result.weight, H_mean, accumulator.tokens) / inputs.total
        else:
            runner.set_weight(name, result.weight)
            error = runner.squared_error(block, inputs.rows, inputs.reference, inputs.weights) / inputs.total
        found.append(AnchorResult(candidate, storage_bits(candidate.plan(K), columns), error))
    runner.set_weight(name, original)
    return sorted(found, key=lambda a: a.candidate)


def run_measure(ctx: JobContext, state: JobState, workers: Workers) -> JobState:
    """MEASURE: every anchor of every linear, block by block on the fp16 stream of the measurement
    rows (each linear, and the stream's pass into its next buffer, a task: in parallel on Ray
    workers); a checkpoint after each block (its errors, and where the stream's rows are)."""
    if ctx.config.measurement is not None:
        return state
    count, blocks, total = ctx.config.calibration.measure_rows, 2 * ctx.layers, ctx.layers * len(DECODER_LINEARS)
    partial_path = ctx.work / PARTIAL_MEASUREMENT
    partial = json.loads(partial_path.read_text()) if partial_path.is_file() else {}
    for index in range(state.blocks_done, blocks):
        layer, block = divmod(index, 2)
        source = current_location(state.streams, MEASURED)
        specs = block_specs(BLOCKS[block])
        tasks: list[Task] = [MeasureLinear(layer, BLOCKS[block], spec.name, source, count) for spec in specs]
        tasks.append(StreamBlock(MEASURED, layer, BLOCKS[block], source, count))

        done = iter(
            range(layer * len(DECODER_LINEARS) + (len(DECODER_LINEARS) - len(specs) if block else 0) + 1, total + 1)
        )

        def report(task: Task, worker: int, _result: object, layer: int = layer) -> None:
            if isinstance(task, MeasureLinear):
                where = f", worker {worker + 1}" if workers.count > 1 else ""
                ctx.progress(
                    Progress("measure", next(done), total, f"layer {layer + 1}/{ctx.layers}, {task.name}{where}")
                )

        *results, target = workers.map(tasks, report)
        partial.update(
            {layer_prefix(layer) + spec.name: anchors_to_json(anchors) for spec, anchors in zip(specs, results)}
        )
        atomic_write_json(partial_path, partial)
        state = replace(state, blocks_done=index + 1, streams={**state.streams, MEASURED: target})
        save_state(ctx.work, state)
    shapes = linear_shapes(ctx.cfg)
    measurements = {
        name: LinearMeasurement(*shapes[name], anchors_from_json(entries)) for name, entries in partial.items()
    }
    atomic_write_json(Path(ctx.config.out_dir) / MEASUREMENT_FILE, measurement_to_json(measurements, _meta(ctx)))
    ctx.store.remove(MEASURED)
    return state


def _meta(ctx: JobContext) -> dict[str, Any]:
    spec = ctx.config.calibration
    return {
        "model": str(ctx.config.model_dir),
        "quantizer": QUANTIZER_VERSION,
        "calibration": {"rows": spec.measure_rows, "length": spec.length, "dataset": spec.dataset_name()},
    }


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
