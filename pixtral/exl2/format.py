"""The EXL2 storage format of one linear layer: the read side, as small pure functions.

Spec: ../shared/spec/exl2-format.md §1–§3. Orientation: EXL2 stores `W = weight.T` of shape [K, N]
("rows" are input features, in act-order storage order; "columns" are outputs, padded to N' = 32k).
Groups are contiguous runs of storage rows in non-increasing bit width (8, 6, 5, 4, 3, 2: the kernel
walks fixed sections in that order). Each column of a group is one little-endian bitstream of
R·b bits cut into uint32 words; the zero point is the implicit 2^(b-1). The writer's half (packing)
is pixtral/exl2/pack.py; everything a reader needs (unpacking, exact dequantization, bpw) is here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pixtral.errors import UserError

EXL2_BITS = (8, 6, 5, 4, 3, 2)  # the only widths, in the order the kernel expects them
SCALE_BITS = 4
COLUMN_ALIGN = 32
INT16_MAX = 32767


class FormatError(UserError):
    """Tensors that do not form a valid EXL2 layer."""


@dataclass(frozen=True)
class GroupPlan:
    """Bit width and row count of every group of one matrix, in storage order."""

    groups: tuple[tuple[int, int], ...]  # (bits, rows)

    def __post_init__(self) -> None:
        if not self.groups:
            raise FormatError("a group plan needs at least one group")
        previous = 8
        for index, (bits, rows) in enumerate(self.groups):
            if bits not in EXL2_BITS:
                raise FormatError(f"group {index}: {bits} bits; EXL2 has {EXL2_BITS}")
            if bits > previous:
                raise FormatError(f"group {index}: {bits} bits after {previous}: widths must not increase")
            step = 16 if bits == 2 else 32  # kernels step 32 rows at a time (16 in the 2-bit section)
            if rows <= 0 or rows % step:
                raise FormatError(f"group {index}: {rows} rows; {bits}-bit groups need a positive multiple of {step}")
            previous = bits

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.groups)

    @property
    def packed_rows(self) -> int:
        return sum(rows * bits // 32 for bits, rows in self.groups)

    def row_bits(self) -> Tensor:
        """Bit width of every storage row, [K]."""
        return torch.cat([torch.full((rows,), bits) for bits, rows in self.groups])

    @staticmethod
    def from_proportions(rows: int, bits: list[int], proportions: list[float], group_size: dict[int, int]) -> GroupPlan:
        """exllamav2's rule (`configure()`, spec §2.1): widths in list order, ceil(K·p / gs) groups
        each, every group `group_size[b]` rows except a shorter last one."""
        remaining, counts = rows, []
        for b, p in zip(bits, proportions):
            count = math.ceil(min(rows * p, remaining) / group_size[b])
            counts.append(count)
            remaining -= count * group_size[b]
        groups, start = [], 0
        for b, count in zip(bits, counts):
            for _ in range(count):
                size = min(group_size[b], rows - start)
                if size > 0:
                    groups.append((b, size))
                    start += size
        if start != rows:
            raise FormatError(f"proportions {proportions} of {bits} do not cover {rows} rows")
        return GroupPlan(tuple(groups))

    def describe(self) -> str:
        """Like `4b×30/3b×2` for runs of equal (bits, rows), with the group size."""
        runs: list[list[int]] = []
        for bits, rows in self.groups:
            if runs and runs[-1][0] == bits and runs[-1][1] == rows:
                runs[-1][2] += 1
            else:
                runs.append([bits, rows, 1])
        return " ".join(f"{b}b:{n}×{r}" for b, r, n in runs)


def word_block(bits: int) -> tuple[int, int]:
    """(codes, words) of the smallest run of codes that fills whole uint32 words."""
    codes = 32 // math.gcd(bits, 32)
    return codes, codes * bits // 32


def unpack_codes(words: Tensor, bits: int) -> Tensor:
    """int32 words [Q, N] -> codes [Q·32/bits, N] (int64)."""
    Q, N = words.shape
    per_block, words_per_block = word_block(bits)
    stream = (words.to(torch.int64) & 0xFFFFFFFF).reshape(Q // words_per_block, words_per_block, N)
    mask = (1 << bits) - 1
    codes = torch.empty(Q // words_per_block, per_block, N, dtype=torch.int64)
    for r in range(per_block):
        word, shift = divmod(r * bits, 32)
        value = stream[:, word] >> shift
        if shift + bits > 32:
            value = value | (stream[:, word + 1] << (32 - shift))
        codes[:, r] = value & mask
    return codes.reshape(-1, N)


def unpack_q_weight(q_weight: Tensor, plan: GroupPlan) -> Tensor:
    """`q_weight` [Q, N'] -> codes [K, N'] in storage order."""
    blocks, start = [], 0
    for bits, rows in plan.groups:
        packed = rows * bits // 32
        blocks.append(unpack_codes(q_weight[start : start + packed], bits))
        start += packed
    return torch.cat(blocks)


def unpack_scales(q_scale: Tensor) -> Tensor:
    """`q_scale` [G, N'/8] -> scale codes [G, N'] in [0, 15]."""
    words = q_scale.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(8, dtype=torch.int64) * SCALE_BITS
    return ((words[..., None] >> shifts) & 0xF).reshape(q_scale.shape[0], -1)


def parse_q_groups(q_groups: Tensor, packed_rows: int, name: str = "q_groups") -> GroupPlan:
    """Recover the plan from `q_groups` and the number of `q_weight` rows, checking consistency."""
    values = [int(v) for v in q_groups.tolist()]
    if len(values) % 2 or not values:
        raise FormatError(f"{name}: {len(values)} entries; expected (bits, offset) pairs")
    bits, starts = values[0::2], values[1::2]
    ends = starts[1:] + [packed_rows]
    if starts[0] != 0:
        raise FormatError(f"{name}: first group starts at packed row {starts[0]}, expected 0")
    groups = []
    for index, (b, start, end) in enumerate(zip(bits, starts, ends)):
        if b not in EXL2_BITS or end <= start or (end - start) * 32 % b:
            raise FormatError(
                f"{name}: group {index} ({b} bits, packed rows {start}..{end}) is inconsistent with q_weight"
            )
        groups.append((b, (end - start) * 32 // b))
    try:
        return GroupPlan(tuple(groups))
    except FormatError as err:
        raise FormatError(f"{name}: {err}") from err


def q_invperm_to_perm(q_invperm: Tensor) -> Tensor:
    return torch.argsort(q_invperm.to(torch.int64))


def effective_scales(scale_codes: Tensor, q_scale_max: Tensor, prescale: float = 1.0) -> Tensor:
    """fp16 scale of each (group, column), rounded exactly as the CUDA kernels do (spec §2.8)."""
    group_max = (q_scale_max.float() * (prescale / 256)).half()  # ext.py: fp16 tensor *= prescale/256
    squares = ((scale_codes + 1) ** 2).half()  # exact: at most 256
    return squares * group_max[:, None]  # one fp16 rounding of an exact product (__hmul)


def dequantize(
    q_weight: Tensor, q_scale: Tensor, q_scale_max: Tensor, q_groups: Tensor, q_invperm: Tensor, prescale: float = 1.0
) -> Tensor:
    """The fp16 weight [N', K] (nn.Linear orientation) that exllamav2's reconstruct path produces."""
    plan = parse_q_groups(q_groups, q_weight.shape[0])
    codes = unpack_q_weight(q_weight, plan)  # [K, N'] storage order
    scales = effective_scales(unpack_scales(q_scale), q_scale_max, prescale)  # [G, N']
    group_of_row = torch.repeat_interleave(torch.arange(len(plan.groups)), torch.tensor([r for _, r in plan.groups]))
    zero = (2 ** (plan.row_bits() - 1))[:, None]
    stored = (codes - zero).half() * scales[group_of_row]  # [K, N'] fp16, one rounding
    return stored[q_invperm.to(torch.int64)].T.contiguous()  # W_orig[i] = W_stored[q_invperm[i]]


def storage_bits(plan: GroupPlan, columns: int, bias: bool = False) -> int:
    """Bits a layer costs in exllamav2's accounting (spec §3.2); derived tensors and padding excluded."""
    groups = len(plan.groups)
    return (
        sum(rows * columns * bits for bits, rows in plan.groups)
        + groups * 16  # q_scale_max
        + groups * 32  # q_groups
        + groups * columns * SCALE_BITS  # q_scale
        + plan.rows * 32  # q_invperm
        + (16 * columns if bias else 0)
    )


def bits_per_weight(plan: GroupPlan, columns: int, bias: bool = False) -> float:
    return storage_bits(plan, columns, bias) / (plan.rows * columns + (columns if bias else 0))


def pad_columns(columns: int) -> int:
    """N -> N', the next multiple of 32 (exllamav2 pads out_features at load)."""
    return -(-columns // COLUMN_ALIGN) * COLUMN_ALIGN
