"""Bit allocation from exllamav2's own measurement.json (../shared/spec/exl2-format.md §4.4).

Its slots are whole blocks (`…layers.N.self_attn`, `…layers.N.mlp`), each with about 17-19 rows of
per-projection QParams and a measured `accuracy` (1 − relative output error). A block picks one row;
its QParams become our GroupPlans through exllamav2's own grouping rule, and we price every plan
with our accounting.
"""

from __future__ import annotations

from typing import Any

from runtime.exl2_format import GroupPlan, storage_bits

from .allocate import Option, allocate
from .strategy import MeasurementError, TierPlan, finish_tier


def is_exllamav2_measurement(data: dict[str, Any]) -> bool:
    return isinstance(data.get("measurement"), dict)


def qparams_plan(qparams: dict[str, Any], rows: int) -> GroupPlan:
    """exllamav2 QParams dict -> the GroupPlan its configure() produces for `rows` inputs."""
    group_size = qparams["group_size"]
    if not isinstance(group_size, dict):
        group_size = {b: group_size for b in qparams["bits"]}
    sizes = {int(b): int(s) for b, s in group_size.items()}
    return GroupPlan.from_proportions(rows, [int(b) for b in qparams["bits"]], [float(p) for p in qparams["bits_prop"]], sizes)


def plan_tier_exllamav2(data: dict[str, Any], shapes: dict[str, tuple[int, int]], target_bpw: float, source: str) -> TierPlan:
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
