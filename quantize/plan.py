"""From a measurement to one bit layout per linear for each target bpw.

Our measurement.json holds, per decoder linear, the measured error of each anchor candidate. The
errors along a linear's chain of candidates (cheapest to dearest) are made non-increasing by
isotonic regression (more bits never hurt in expectation; this removes measurement noise), then
interpolated over `hi_rows` to price every candidate of candidates.py; allocate.py then picks one
per linear. exllamav2's measurement.json (per-block rows of QParams with an accuracy) is accepted
too: then each block chooses one of its rows, through exllamav2's own grouping rule.
The budget is `int(numel · bpw)` over the decoder's layer linears, head excluded, as exllamav2.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixtral.exl2.format import GroupPlan, storage_bits
from quantize.allocate import Option, allocate
from quantize.candidates import Candidate, all_candidates, make_plan
from quantize.measure import LinearMeasurement, MeasurementError, load_measurement, measurement_from_json

FINE_GROUP_ROWS = 32  # the finest scale groups refine_groups() makes


@dataclass(frozen=True)
class TierPlan:
    target_bpw: float
    plans: dict[str, GroupPlan]  # linear prefix -> layout
    bits: int
    numel: int

    @property
    def bpw(self) -> float:
        return self.bits / self.numel


def isotonic_decreasing(values: list[float]) -> list[float]:
    """Closest non-increasing sequence (least squares, pool-adjacent-violators)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(int(count))]


def candidate_options(m: LinearMeasurement) -> tuple[list[Candidate], list[Option]]:
    """Every candidate of the linear with its exact cost and interpolated (monotone) error."""
    anchors = sorted(m.anchors, key=lambda a: a.bits)
    smoothed = dict(zip((a.candidate for a in anchors), isotonic_decreasing([a.error for a in anchors])))
    pure = {c.lo: e for c, e in smoothed.items() if c.hi_rows == 0}  # a pair at 0 hi rows is pure lo
    pure.update({c.hi: e for c, e in smoothed.items() if c.hi_rows == m.rows})
    chains: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for candidate, error in smoothed.items():
        chains.setdefault((candidate.hi, candidate.lo), []).append((candidate.hi_rows, error))
    for (hi, _), points in chains.items():
        if hi in pure and all(x != m.rows for x, _ in points):
            points.append((m.rows, pure[hi]))  # the pair ends where the next one starts
    candidates, options = [], []
    for candidate in all_candidates(m.rows):
        points = sorted(chains.get((candidate.hi, candidate.lo), []))
        if len(points) < 2:
            continue
        candidates.append(candidate)
        options.append(Option(candidate.storage_bits(m.rows, m.columns), _interpolate(points, candidate.hi_rows)))
    return candidates, options


def _interpolate(points: list[tuple[int, float]], x: int) -> float:
    xs = [p[0] for p in points]
    i = bisect.bisect_left(xs, x)
    if i < len(xs) and xs[i] == x:
        return points[i][1]
    i = min(max(i, 1), len(xs) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def plan_tier(measurements: dict[str, LinearMeasurement], target_bpw: float) -> TierPlan:
    """Choose a layout for every linear so the decoder lands on `target_bpw` with the least error."""
    names = sorted(measurements)
    priced = [candidate_options(measurements[name]) for name in names]
    numel = sum(measurements[n].rows * measurements[n].columns for n in names)
    budget = int(numel * target_bpw)
    choice = allocate([options for _, options in priced], budget)
    plans = {name: priced[i][0][choice[i]].plan(measurements[name].rows) for i, name in enumerate(names)}
    return finish_tier(target_bpw, plans, {n: m.columns for n, m in measurements.items()}, budget, numel)


def finish_tier(
    target_bpw: float, plans: dict[str, GroupPlan], columns: dict[str, int], budget: int, numel: int
) -> TierPlan:
    """Spend what the allocation left on finer scale groups, and total the bits."""
    bits = sum(storage_bits(plan, columns[name]) for name, plan in plans.items())
    plans, bits = refine_groups(plans, columns, budget - bits, bits)
    return TierPlan(target_bpw, plans, bits, numel)


def refine_groups(
    plans: dict[str, GroupPlan], columns: dict[str, int], left: int, bits: int
) -> tuple[dict[str, GroupPlan], int]:
    """Split groups into 32-row groups (the widest, most important rows first) while bits are left.

    A finer scale grid never makes a group's fit worse and costs only a few bits per column, so
    this fills the gap the allocation's coarser steps leave, which matters on small models.
    """
    plans = dict(plans)
    changed = True
    while changed:
        changed = False
        for name in sorted(plans, key=lambda n: (-columns[n], n)):
            groups = list(plans[name].groups)
            for index, (width, rows) in enumerate(groups):
                if rows <= FINE_GROUP_ROWS:
                    continue
                finer = GroupPlan(
                    tuple(groups[:index] + [(width, FINE_GROUP_ROWS)] * (rows // FINE_GROUP_ROWS) + groups[index + 1 :])
                )
                cost = storage_bits(finer, columns[name]) - storage_bits(plans[name], columns[name])
                if cost <= left:
                    plans[name], left, bits, changed = finer, left - cost, bits + cost, True
                break  # one split per linear per sweep: spread the bits over many linears
    return plans, bits


def minimum_bpw(shapes: dict[str, tuple[int, int]]) -> float:
    """The lowest bpw any layout reaches for these (rows, columns) shapes: everything at 2 bits."""
    bits = sum(storage_bits(make_plan(k, 3, 2, 0), n) for k, n in shapes.values())
    return bits / sum(k * n for k, n in shapes.values())


# --- exllamav2's measurement.json ---------------------------------------------------------------


def is_exllamav2_measurement(data: dict[str, Any]) -> bool:
    return isinstance(data.get("measurement"), dict)


def qparams_plan(qparams: dict[str, Any], rows: int) -> GroupPlan:
    """exllamav2 QParams dict -> the GroupPlan its configure() produces for `rows` inputs."""
    group_size = qparams["group_size"]
    if not isinstance(group_size, dict):
        group_size = {b: group_size for b in qparams["bits"]}
    sizes = {int(b): int(s) for b, s in group_size.items()}
    return GroupPlan.from_proportions(
        rows, [int(b) for b in qparams["bits"]], [float(p) for p in qparams["bits_prop"]], sizes
    )


def plan_tier_exllamav2(
    data: dict[str, Any], shapes: dict[str, tuple[int, int]], target_bpw: float, source: str
) -> TierPlan:
    """Choose one measured row per block so the decoder lands near `target_bpw`."""
    blocks: dict[str, list[str]] = {}
    for prefix in shapes:
        block, _, linear = prefix.rpartition(".")
        blocks.setdefault(block, []).append(linear)
    slots, plans_per_slot = [], []
    for block in sorted(blocks):
        rows = data["measurement"].get(block)
        if not rows:
            raise MeasurementError(f"{source}: no measurement for {block} (is it for this model?)")
        options, plans = [], []
        for row in rows:
            try:
                plan = {lin: qparams_plan(row[lin], shapes[f"{block}.{lin}"][0]) for lin in blocks[block]}
            except KeyError as err:
                raise MeasurementError(f"{source}: {block} row lacks {err}") from err
            bits = sum(storage_bits(plan[lin], shapes[f"{block}.{lin}"][1]) for lin in plan)
            error = (1.0 - float(row["accuracy"])) ** 2  # our objective: squared relative error
            options.append(Option(bits, error))
            plans.append(plan)
        slots.append(options)
        plans_per_slot.append((block, plans))
    numel = sum(k * n for k, n in shapes.values())
    choice = allocate(slots, int(numel * target_bpw))
    chosen: dict[str, GroupPlan] = {}
    for (block, plans), index in zip(plans_per_slot, choice):
        chosen.update({f"{block}.{lin}": plan for lin, plan in plans[index].items()})
    return finish_tier(target_bpw, chosen, {name: n for name, (_, n) in shapes.items()}, int(numel * target_bpw), numel)


def tier_planner(path: Path, shapes: dict[str, tuple[int, int]]) -> Callable[[float], TierPlan]:
    """Read a measurement (ours or exllamav2's: the one place that tells them apart), check that it
    covers every linear (ours) or block (exllamav2's) of a model with these linear `shapes`, and
    return the planner of a tier at a target bpw."""
    data = load_measurement(path)
    if is_exllamav2_measurement(data):
        blocks = sorted({prefix.rpartition(".")[0] for prefix in shapes})
        missing = [b for b in blocks if not data["measurement"].get(b)]
        if missing:
            raise MeasurementError(
                f"{path}: no measurement for {missing[0]} ({len(missing)} blocks missing); it belongs to another model"
            )
        return lambda bpw: plan_tier_exllamav2(data, shapes, bpw, str(path))
    measurements = measurement_from_json(data, str(path))
    for name, (rows, columns) in shapes.items():
        m = measurements.get(name)
        if m is None or (m.rows, m.columns) != (rows, columns):
            raise MeasurementError(
                f"{path}: no measurement for {name} with shape {rows}×{columns}; it belongs to another model"
            )
    return lambda bpw: plan_tier(measurements, bpw)
