"""GPTQ for EXL2: act-order, per-group 4-bit scales with a p-grid search, error feedback.

The math is exllamav2's (../shared/spec/exl2-format.md §4.6) written in plain torch so it runs on any
device and is its own reference: `H⁻¹ = UᵀU` (upper Cholesky factor of the damped inverse Hessian);
each group is quantized row by row, pushing each row's error onto the rows after it inside the group
(`quantize_group`, fused on CUDA by gptq_triton.py), then onto all later rows at once (the lazy block
update, block = group). With `H = I` no error moves between rows: the same function is round-to-nearest.

A run can be snapshotted at group boundaries and resumed from one with another plan: candidates
that share a prefix of rows with a pure-width run (act-order's most important rows at the high width)
continue from its snapshot instead of redoing the prefix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pixtral.errors import UserError
from pixtral.exl2.format import GroupPlan, pad_columns
from pixtral.exl2.pack import build_q_groups, pack_q_weight, pack_scales, perm_to_q_invperm

DAMP = 0.12  # exllamav2's percdamp since 2024-04: fraction of mean(diag H) added to the diagonal
DAMP_RETRIES = 10  # add the damping again this many times before declaring H singular
P_GRID = 96  # scale search: 97 multipliers p in [P_MIN, P_MAX]
P_MIN, P_MAX = 0.70, 1.20
P_COARSE = 8  # coarse-to-fine: every 8th multiplier, then every one within 7 of the best (27 of 97)
ERR_NORM = 3.5  # the search minimises Σ|Δw|^3.5: weighs large errors more than L2
P_SEARCH_ELEMENTS = 1 << 19  # [chunk, R, N] temporaries of 2 MiB: they stay in cache (1.5× faster than 8 MiB on CPU)
P_COARSE_ROWS = 32  # rows of a group the coarse step scores (a strided sample)
INNER_ROWS = 32  # rows per rank-1 block inside a group (quantize_group)
P_SEARCH_MAX_COLUMNS = 16384  # one scalar p per group: a strided sample of a 131k-wide head finds it as well


class QuantizationError(UserError):
    """A layer that cannot be quantized (a singular Hessian: dead or duplicated input channels)."""


@dataclass(frozen=True)
class PreparedHessian:
    """Act-order permutation and the upper factor U of the damped H⁻¹, shared by q/k/v (gate/up)."""

    perm: Tensor  # [K] storage row -> original input feature
    U: Tensor  # [K, K] upper triangular, in storage order
    H: Tensor  # [K, K] undamped, original order (for the proxy error)


@dataclass(frozen=True)
class GroupResult:
    """One group's rows after quantization (storage order)."""

    codes: Tensor  # [R, N'] uint8
    deq: Tensor  # [R, N'] fp32: what exllamav2 reconstructs
    Err: Tensor  # [R, N'] fp32: (w - deq) / U[c, c], the error pushed onto later rows
    scale_code: Tensor  # [N'] int64 in [0, 15]
    scale_max: Tensor  # [] fp16


GroupFn = Callable[[Tensor, Tensor, int], GroupResult]


@dataclass(frozen=True)
class Snapshot:
    """The state of a run after its first `row` storage rows: enough to continue with another plan."""

    row: int
    Wq: Tensor  # [K - row, N'] remaining rows with every earlier error applied
    codes: Tensor  # [row, N']
    deq: Tensor  # [row, N']
    scale_codes: tuple[Tensor, ...]
    scale_max: tuple[Tensor, ...]


@dataclass(frozen=True)
class GPTQResult:
    codes: Tensor  # [K, N'] uint8 in [0, 2^b), storage order
    scale_codes: Tensor  # [G, N'] int64 in [0, 15] (qscale − 1)
    scale_max: Tensor  # [G] fp16, stored undivided
    perm: Tensor  # [K]
    weight: Tensor  # [N, K] fp32: exactly what exllamav2 dequantizes (padding cropped)
    proxy_error: float | None = None  # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), when asked for
    snapshots: dict[int, Snapshot] = field(default_factory=dict)


def prepare_hessian(H: Tensor, damp: float = DAMP, act_order: bool = True) -> PreparedHessian:
    """Permute H by descending diagonal, damp it, and factor its inverse."""
    K = H.shape[0]
    perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(K, device=H.device)
    Hp = H[perm][:, perm].clone()
    step = torch.clamp(damp * torch.diag(Hp).mean(), min=1e-5)
    idx = torch.arange(K, device=H.device)
    for _ in range(DAMP_RETRIES):
        Hp[idx, idx] += step
        L, info = torch.linalg.cholesky_ex(Hp)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0 and not torch.isnan(U).any():
                return PreparedHessian(perm, U, H)
    raise QuantizationError(
        "Hessian is not invertible even after repeated damping (dead or duplicated input channels?)"
    )


def p_grid(device: torch.device | str) -> Tensor:
    """The 97 scale multipliers p of exllamav2's search."""
    return torch.linspace(0, 1, P_GRID + 1, device=device) * (P_MAX - P_MIN) + P_MIN


def base_scales(W: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-column scales before the search: (qscale in 1..16 [N], the group's max base scale M [])."""
    maxq = 2**bits - 1
    base = (W.abs().amax(dim=0) + 1e-12) / (maxq / 2)  # [N]
    M = base.max()
    return torch.clamp(torch.round(16 * torch.sqrt(base / M)), 1, 16), M


def scale_errors(W: Tensor, s: Tensor, p: Tensor, bits: int) -> Tensor:
    """Σ|q(W; s·p) − W|^3.5 over the group W [R, N] for each multiplier p [P].

    With r = W / sp, |q·sp − W| = sp·|q − r|: the power is taken of |q − r| (as e²·e·√e, far
    cheaper than a general pow) and each column's sp^3.5 applied after summing its rows."""
    maxq, zero = 2**bits - 1, 2 ** (bits - 1)
    chunk = max(1, P_SEARCH_ELEMENTS // W.numel())  # bound the [chunk, R, N] temporaries
    errors = []
    for start in range(0, p.shape[0], chunk):
        sp = s[None, :] * p[start : start + chunk, None]  # [c, N]
        r = W[None] / sp[:, None, :]
        e = torch.clamp(torch.round(r), -zero, maxq - zero).sub_(r).abs_()
        powered = e.square().mul_(e).mul_(e.sqrt())  # |q − r|^3.5
        errors.append((powered.sum(dim=1) * sp**ERR_NORM).sum(dim=1))
    return torch.cat(errors)


def search_p(
    errors_of: Callable[[Tensor], Tensor],
    grid: Tensor,
    full: bool = False,
    coarse_errors_of: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The multiplier with the least error: every 8th of the grid (scored by `coarse_errors_of`, a
    sample of the group's rows, when given), then all within 7 of the best; `full` tries all 97."""
    if full:
        return grid[torch.argmin(errors_of(grid))]
    coarse = torch.arange(0, grid.shape[0], P_COARSE, device=grid.device)
    best = int(coarse[torch.argmin((coarse_errors_of or errors_of)(grid[coarse]))])
    fine = torch.arange(max(0, best - P_COARSE + 1), min(grid.shape[0], best + P_COARSE), device=grid.device)
    return grid[fine[torch.argmin(errors_of(grid[fine]))]]


ScaleErrorFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]


def find_scales(
    W: Tensor, bits: int, full_search: bool = False, errors: ScaleErrorFn = scale_errors
) -> tuple[Tensor, Tensor, Tensor]:
    """Scales of one group W [R, N]: (scale_codes [N], scale_max fp16 [], effective fp32 scale [N]);
    `errors` scores the multipliers (the Triton kernel on CUDA)."""
    qscale, M = base_scales(W, bits)
    s = (qscale / 16) ** 2 * M
    stride = -(-W.shape[1] // P_SEARCH_MAX_COLUMNS)  # wide layers: a strided sample of the columns
    Ws, ss = W[:, ::stride], s[::stride]
    Wc = Ws[:: max(1, Ws.shape[0] // P_COARSE_ROWS)]  # the coarse step only finds the basin: a row sample does
    best_p = search_p(
        lambda p: errors(Ws, ss, p, bits), p_grid(W.device), full_search, lambda p: errors(Wc, ss, p, bits)
    )
    scale_max = (M * best_p).half()
    effective = ((qscale**2).half() * (scale_max.float() / 256).half()).float()  # fp16 roundings as the kernel
    return (qscale - 1).long(), scale_max, effective


def quantize_group(Wg: Tensor, Ug: Tensor, bits: int, full_search: bool = False) -> GroupResult:
    """The reference group step: scales from the group's current rows, then row by row quantize and
    push the row's error onto the rows after it in the group. Wg [R, N'] is updated in place."""
    zero, maxq = 2 ** (bits - 1), 2**bits - 1
    scale_code, scale_max, s = find_scales(Wg, bits, full_search)
    s16 = s.half()
    R = Wg.shape[0]
    codes = torch.empty(R, Wg.shape[1], dtype=torch.uint8, device=Wg.device)
    deq, Err = torch.empty_like(Wg), torch.empty_like(Wg)
    # two-level lazy update: rank-1 updates inside blocks of INNER_ROWS, one matmul per block for the
    # group's later rows (the same arithmetic as row by row over the whole group, less memory traffic)
    for b0 in range(0, R, INNER_ROWS):
        b1 = min(b0 + INNER_ROWS, R)
        for c in range(b0, b1):
            q = torch.clamp(torch.round(Wg[c] / s) + zero, 0, maxq)
            codes[c] = q.to(torch.uint8)
            deq[c] = ((q - zero).half() * s16).float()
            Err[c] = (Wg[c] - deq[c]) / Ug[c, c]
            Wg[c:b1].addr_(Ug[c, c:b1], Err[c], alpha=-1)  # rank-1 update inside the block, in place
        Wg[b1:].addmm_(Ug[b0:b1, b1:].T, Err[b0:b1], alpha=-1)
    return GroupResult(codes, deq, Err, scale_code, scale_max)


def gptq_quantize(
    W: Tensor,
    Hp: PreparedHessian,
    plan: GroupPlan,
    *,
    group: GroupFn = quantize_group,
    start: Snapshot | None = None,
    snapshot_rows: Iterable[int] = (),
    proxy: bool = False,
) -> GPTQResult:
    """Quantize W [N, K] (nn.Linear orientation) with the groups of `plan` (K rows, storage order).

    `start` continues a run from its snapshot (the plan's groups must begin at its row);
    `snapshot_rows` (group boundaries) are recorded for others to continue from."""
    N, K = W.shape
    Np, U, row0 = pad_columns(N), Hp.U, start.row if start is not None else 0
    Wq = torch.zeros(K, Np, device=W.device)  # work copy in storage order, columns padded with zeros
    codes = torch.zeros(K, Np, dtype=torch.uint8, device=W.device)  # 8 bits at most: a byte per code
    deq = torch.zeros(K, Np, device=W.device)
    if start is None:
        Wq[:, :N] = W.float().T[Hp.perm]
        scale_codes, scale_max = [], []
    else:
        Wq[row0:], codes[:row0], deq[:row0] = start.Wq, start.codes, start.deq
        scale_codes, scale_max = list(start.scale_codes), list(start.scale_max)
    wanted, snapshots = set(snapshot_rows), {}
    i1 = 0
    for bits, rows in plan.groups:
        i2 = i1 + rows
        if i1 >= row0:
            if i1 in wanted:
                snapshots[i1] = Snapshot(
                    i1, Wq[i1:].clone(), codes[:i1].clone(), deq[:i1].clone(), tuple(scale_codes), tuple(scale_max)
                )
            result = group(Wq[i1:i2], U[i1:i2, i1:i2], bits)
            codes[i1:i2], deq[i1:i2] = result.codes, result.deq
            scale_codes.append(result.scale_code)
            scale_max.append(result.scale_max)
            Wq[i2:].addmm_(U[i1:i2, i2:].T, result.Err, alpha=-1)  # the lazy update of every later row
        elif i2 > row0:
            raise ValueError(f"plan has a group across the snapshot's row {row0}")
        i1 = i2
    weight = deq[torch.argsort(Hp.perm)][:, :N].T.contiguous()  # [N, K], original input order
    error = proxy_error(W, weight, Hp.H) if proxy else None
    return GPTQResult(codes, torch.stack(scale_codes), torch.stack(scale_max), Hp.perm, weight, error, snapshots)


def proxy_error(W: Tensor, weight: Tensor, H: Tensor) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): the relative output error on the calibration inputs."""
    dW, H = weight - W.float(), H.float()
    return float(torch.sum((dW @ H) * dW) / torch.sum((W.float() @ H) * W.float()).clamp_min(1e-30))


def output_error(W: Tensor, weight: Tensor, H: Tensor, tokens: float) -> float:
    """Σ over calibration tokens of ‖ΔW x‖² = tokens · tr(ΔW H ΔWᵀ), H the mean of x xᵀ: the exact
    output error of a linear whose output goes straight into the residual (o_proj, down_proj)."""
    dW = weight - W.float()
    return float(torch.sum((dW @ H.float()) * dW)) * tokens


def rtn_quantize(W: Tensor, plan: GroupPlan, H: Tensor | None = None) -> GPTQResult:
    """Round-to-nearest baseline: the same scales and grouping, no error feedback, no act-order."""
    K = W.shape[1]
    eye = torch.eye(K, device=W.device)
    Hp = PreparedHessian(torch.arange(K, device=W.device), eye, H if H is not None else eye)
    return gptq_quantize(W, Hp, plan, proxy=H is not None)


def pack_exl2(result: GPTQResult, plan: GroupPlan, bias: Tensor | None = None) -> dict[str, Tensor]:
    """The tensors exllamav2 loads for one layer, keyed by suffix (all on CPU)."""
    tensors = {
        "q_weight": pack_q_weight(result.codes.cpu(), plan),
        "q_scale": pack_scales(result.scale_codes.cpu()),
        "q_scale_max": result.scale_max.cpu(),
        "q_groups": build_q_groups(plan),
        "q_invperm": perm_to_q_invperm(result.perm.cpu()),
    }
    if bias is not None:
        padded = torch.zeros(result.codes.shape[1], dtype=torch.float16)
        padded[: bias.numel()] = bias.half().cpu()
        tensors["bias"] = padded
    return tensors
