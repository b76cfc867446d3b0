"""Bit allocation: pick one option per slot to minimise the summed error within a bit budget.

A multiple-choice knapsack, solved greedily along each slot's lower convex hull (the classic
Lagrangian path: always buy the step with the most error removed per bit), then topped up with any
single-slot move that still fits and does not raise the error. With the fine-grained candidates of
options.py this lands within a few hundred bits of the budget. Pure: numbers in, indices out.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from pixtral.errors import UserError


@dataclass(frozen=True)
class Option:
    bits: int  # storage cost
    error: float  # expected contribution to the objective


class InfeasibleBudget(UserError):
    """Even the cheapest option everywhere costs more than the budget."""


def _hull(options: list[Option]) -> list[int]:
    """Indices on the lower-left convex hull of (bits, error), by increasing bits."""
    order = sorted(range(len(options)), key=lambda i: (options[i].bits, options[i].error))
    frontier: list[int] = []
    for i in order:  # keep only options that lower the error as bits grow
        if not frontier or options[i].error < options[frontier[-1]].error:
            frontier.append(i)
    hull: list[int] = []
    for i in frontier:
        while len(hull) >= 2:
            a, b = options[hull[-2]], options[hull[-1]]
            c = options[i]
            # drop b if it lies above the segment a-c (not convex)
            if (b.error - a.error) * (c.bits - a.bits) >= (c.error - a.error) * (b.bits - a.bits):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(options: list[list[Option]], budget_bits: int) -> list[int]:
    """Index of the chosen option for every slot; total bits ≤ `budget_bits`."""
    hulls = [_hull(slot) for slot in options]
    choice = [hull[0] for hull in hulls]
    spent = sum(options[s][c].bits for s, c in enumerate(choice))
    if spent > budget_bits:
        raise InfeasibleBudget(f"the cheapest layout needs {spent} bits, the budget is {budget_bits}")
    position = [0] * len(options)
    heap: list[tuple[float, int]] = []

    def push(slot: int) -> None:
        if position[slot] + 1 < len(hulls[slot]):
            a, b = options[slot][hulls[slot][position[slot]]], options[slot][hulls[slot][position[slot] + 1]]
            heapq.heappush(heap, ((b.error - a.error) / (b.bits - a.bits), slot))

    for slot in range(len(options)):
        push(slot)
    while heap:
        _, slot = heapq.heappop(heap)
        nxt = hulls[slot][position[slot] + 1]
        extra = options[slot][nxt].bits - options[slot][choice[slot]].bits
        if spent + extra <= budget_bits:
            spent += extra
            position[slot] += 1
            choice[slot] = nxt
            push(slot)
    return _top_up(options, choice, budget_bits - spent)


def _top_up(options: list[list[Option]], choice: list[int], left: int) -> list[int]:
    """Spend what is left on single-slot moves that fit and do not raise the error."""
    while True:
        best: tuple[float, int, int, int] | None = None  # (error change, -extra bits, slot, option)
        for slot, slot_options in enumerate(options):
            current = slot_options[choice[slot]]
            for index, option in enumerate(slot_options):
                extra = option.bits - current.bits
                delta = option.error - current.error
                if 0 < extra <= left and delta <= 0:
                    key = (delta, -extra, slot, index)
                    if best is None or key < best:
                        best = key
        if best is None:
            return choice
        _, neg_extra, slot, index = best
        choice[slot] = index
        left += neg_extra
