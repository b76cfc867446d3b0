"""Bit allocation on synthetic numbers: exact budgets, infeasible budgets, monotone behaviour."""

from __future__ import annotations

import itertools
import random

import pytest

from quantize.allocate import InfeasibleBudget, Option, allocate
from quantize.plan import isotonic_decreasing


def _slot(costs: list[int], errors: list[float]) -> list[Option]:
    return [Option(c, e) for c, e in zip(costs, errors)]


def _brute_force(options: list[list[Option]], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*options):
        if sum(o.bits for o in combo) <= budget:
            best = min(best, sum(o.error for o in combo))
    return best


def test_budget_exact_fit_takes_everything() -> None:
    options = [_slot([10, 20, 30], [3.0, 1.0, 0.5]), _slot([10, 20], [2.0, 0.1])]
    choice = allocate(options, 50)
    assert choice == [2, 1]
    assert sum(options[s][c].bits for s, c in enumerate(choice)) == 50


def test_infeasible_budget() -> None:
    with pytest.raises(InfeasibleBudget, match="cheapest layout needs 20 bits"):
        allocate([_slot([10, 20], [1.0, 0.5]), _slot([10], [1.0])], 19)


def test_never_over_budget_and_within_the_greedy_bound_of_optimal() -> None:
    """Greedy along convex hulls is within one slot's error range of the optimum (the LP bound)."""
    rng = random.Random(0)
    for _ in range(200):
        options = []
        for _ in range(rng.randint(1, 4)):
            costs = sorted(rng.sample(range(5, 60), rng.randint(1, 5)))
            errors = sorted((rng.random() for _ in costs), reverse=True)
            options.append(_slot(costs, errors))
        budget = rng.randint(sum(s[0].bits for s in options), sum(s[-1].bits for s in options))
        choice = allocate(options, budget)
        spent = sum(options[s][c].bits for s, c in enumerate(choice))
        assert spent <= budget
        error = sum(options[s][c].error for s, c in enumerate(choice))
        optimum = _brute_force(options, budget)
        one_slot = max(slot[0].error - min(o.error for o in slot) for slot in options)
        assert error <= optimum + one_slot + 1e-12


def test_error_falls_as_budget_grows() -> None:
    rng = random.Random(1)
    options = [
        _slot(list(range(10, 90, 8)), sorted((rng.random() for _ in range(10)), reverse=True)) for _ in range(12)
    ]
    errors = []
    for budget in range(12 * 10, 12 * 82, 40):
        choice = allocate(options, budget)
        errors.append(sum(options[s][c].error for s, c in enumerate(choice)))
    assert all(a >= b for a, b in zip(errors, errors[1:]))


def test_top_up_spends_leftover_on_equal_error_moves() -> None:
    # the second slot's dearer option is no better (a plateau): it is still bought if bits are left
    options = [_slot([10, 30], [1.0, 0.5]), _slot([10, 12], [0.2, 0.2])]
    choice = allocate(options, 42)
    assert choice == [1, 1]


def test_isotonic_decreasing() -> None:
    assert isotonic_decreasing([5.0, 3.0, 4.0, 1.0]) == [5.0, 3.5, 3.5, 1.0]
    values = [random.Random(2).random() for _ in range(30)]
    fitted = isotonic_decreasing(values)
    assert all(a >= b for a, b in zip(fitted, fitted[1:]))
    assert sum(fitted) == pytest.approx(sum(values))
