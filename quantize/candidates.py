"""Candidate bit layouts for one linear, generated from a rule instead of hand-typed tables.

A candidate mixes two adjacent EXL2 widths: the first `hi_rows` storage rows (the inputs with the
largest Hessian diagonal, thanks to act-order) get `hi` bits, the rest `lo` bits. The allocator may
choose any `hi_rows` in steps of 32 (the kernel's row granularity), so every bitrate between 2.1 and
8.0 bpw is within reach and a tier can land on its target bpw. Only a few "anchor" mixes per pair are
quantized and measured; the error between anchors is interpolated (it falls smoothly with hi_rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pixtral.config import PixtralConfig
from pixtral.errors import OptionError
from pixtral.exl2.format import GroupPlan, pad_columns
from pixtral.text import DECODER_LINEARS, layer_prefix

WIDTH_PAIRS = ((3, 2), (4, 3), (5, 4), (6, 5), (8, 6))  # (hi, lo), every adjacent pair of EXL2 widths
ANCHOR_FRACTIONS = (0.0, 0.1, 0.3, 0.6)  # measured shares of hi rows; 1.0 is the next pair's 0.0
# rows per group by width: coarse codes need finer scales (2-bit at 32 rows, as exllamav2's low options)
GROUP_ROWS = {8: 128, 6: 128, 5: 128, 4: 128, 3: 64, 2: 32}
ROW_STEP = 32  # storage rows move between widths 32 at a time (16 would do for 2-bit only)

# exllamav2's head options by --head-bits (qparams_headoptions): (hi, lo, hi share, group rows)
HEAD_OPTIONS = {
    2: (4, 2, 0.3, 32),
    3: (4, 3, 0.15, 32),
    4: (6, 4, 0.15, 32),
    5: (6, 5, 0.15, 128),
    6: (8, 6, 0.15, 128),
    8: (8, 8, 1.0, 128),
}


@dataclass(frozen=True, order=True)
class Candidate:
    """`hi_rows` rows at `hi` bits, then the rest at `lo` bits (hi_rows = K means pure `hi`)."""

    hi: int
    lo: int
    hi_rows: int

    def plan(self, rows: int) -> GroupPlan:
        return make_plan(rows, self.hi, self.lo, self.hi_rows)

    def storage_bits(self, rows: int, columns: int) -> int:
        """`pixtral.exl2.format.storage_bits(self.plan(rows), columns)` in closed form: the allocator prices
        thousands of candidates per linear, too many to build plans for."""
        lo_rows = rows - self.hi_rows
        groups = -(-self.hi_rows // GROUP_ROWS[self.hi]) + -(-lo_rows // GROUP_ROWS[self.lo])
        return columns * (self.hi_rows * self.hi + lo_rows * self.lo) + groups * (48 + 4 * columns) + 32 * rows

    def to_json(self) -> list[int]:
        return [self.hi, self.lo, self.hi_rows]


def _split(rows: int, group_rows: int) -> list[int]:
    """`rows` as groups of `group_rows`, the last one shorter."""
    sizes = [group_rows] * (rows // group_rows)
    return sizes + ([rows % group_rows] if rows % group_rows else [])


def make_plan(rows: int, hi: int, lo: int, hi_rows: int, group_rows: dict[int, int] = GROUP_ROWS) -> GroupPlan:
    """The GroupPlan of `hi_rows` rows at `hi` bits followed by `rows - hi_rows` at `lo` bits."""
    groups = [(hi, n) for n in _split(hi_rows, group_rows[hi])]
    groups += [(lo, n) for n in _split(rows - hi_rows, group_rows[lo])]
    return GroupPlan(tuple(groups))


def anchor_candidates(rows: int) -> list[Candidate]:
    """The candidates measured for a linear with `rows` inputs: each pair at the anchor shares, plus pure 8."""
    out = []
    for hi, lo in WIDTH_PAIRS:
        for share in ANCHOR_FRACTIONS:
            out.append(Candidate(hi, lo, min(rows, round(share * rows / ROW_STEP) * ROW_STEP)))
    out.append(Candidate(8, 6, rows))
    return sorted(set(out))


def all_candidates(rows: int) -> list[Candidate]:
    """Every layout the allocator may choose for a linear with `rows` inputs."""
    return [Candidate(hi, lo, n) for hi, lo in WIDTH_PAIRS for n in range(0, rows + 1, ROW_STEP)]


def head_plan(rows: int, head_bits: int) -> GroupPlan:
    """The head's layout for `--head-bits` (2, 3, 4, 5, 6 or 8), as exllamav2 chooses it."""
    if head_bits not in HEAD_OPTIONS:
        raise OptionError(f"--head-bits must be one of {sorted(HEAD_OPTIONS)}, got {head_bits}")
    hi, lo, share, group = HEAD_OPTIONS[head_bits]
    # exllamav2 rounds the hi share up to whole groups; on a small head (K = 128) that makes every
    # row 8-bit, so where rounding would more than double the share, round to 32-row steps instead
    hi_rows = min(rows, math.ceil(share * rows / group) * group)
    if hi_rows > 2 * share * rows:
        hi_rows = round(share * rows / ROW_STEP) * ROW_STEP
    return make_plan(rows, hi, lo, hi_rows, {hi: group, lo: group})


def linear_shapes(cfg: PixtralConfig) -> dict[str, tuple[int, int]]:
    """(rows K, padded columns N') of every decoder layer linear, by tensor prefix."""
    shapes = {}
    for index in range(cfg.text.num_hidden_layers):
        for spec in DECODER_LINEARS:
            out_features, in_features = spec.shape(cfg.text)
            shapes[layer_prefix(index) + spec.name] = (in_features, pad_columns(out_features))
    return shapes
