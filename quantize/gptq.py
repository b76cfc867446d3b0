"""GPTQ for EXL2: act-order, per-group 4-bit scales with a p-grid search, error feedback.

The math is exllamav2's (../shared/spec/exl2-format.md §4.6) written in plain torch so it runs on any
device and is its own reference: `H⁻¹ = UᵀU` (upper Cholesky factor of the damped inverse Hessian);
each group is quantized row by row, pushing each row's error onto the rows after it inside the group,
then onto all later rows at once (the lazy block update, block = group). With `H = I` no error moves
between rows, so the same function is the round-to-nearest baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from runtime.errors import UserError
from runtime.exl2_format import GroupPlan, pad_columns

from .exl2_pack import build_q_groups, pack_q_weight, pack_scales, perm_to_q_invperm

DAMP = 0.12  # exllamav2's percdamp since 2024-04: fraction of mean(diag H) added to the diagonal
DAMP_RETRIES = 10  # add the damping again this many times before declaring H singular
P_GRID = 96  # scale search: 97 multipliers p in [P_MIN, P_MAX]
P_MIN, P_MAX = 0.70, 1.20
ERR_NORM = 3.5  # the search minimises Σ|Δw|^3.5: weighs large errors more than L2
P_SEARCH_ELEMENTS = 1 << 21  # [chunk, R, N] temporaries of ~8 MiB: reused from the heap, no page-fault storm
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
class GPTQResult:
    codes: Tensor  # [K, N'] uint8 in [0, 2^b), storage order
    scale_codes: Tensor  # [G, N'] int64 in [0, 15] (qscale − 1)
    scale_max: Tensor  # [G] fp16, stored undivided
    perm: Tensor  # [K]
    weight: Tensor  # [N, K] fp32: exactly what exllamav2 dequantizes (padding cropped)
    proxy_error: float  # tr(ΔW H ΔWᵀ) / tr(W H Wᵀ): relative output error on the calibration data


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
    raise QuantizationError("Hessian is not invertible even after repeated damping (dead or duplicated input channels?)")


def find_scales(W: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """Scales of one group W [R, N]: (scale_codes [N], scale_max fp16 [], effective fp32 scale [N])."""
    maxq, zero = 2**bits - 1, 2 ** (bits - 1)
    base = (W.abs().amax(dim=0) + 1e-12) / (maxq / 2)  # [N]
    M = base.max()
    qscale = torch.clamp(torch.round(16 * torch.sqrt(base / M)), 1, 16)  # [N] in 1..16
    s = (qscale / 16) ** 2 * M
    p = torch.linspace(0, 1, P_GRID + 1, device=W.device) * (P_MAX - P_MIN) + P_MIN  # [P]
    stride = -(-W.shape[1] // P_SEARCH_MAX_COLUMNS)  # very wide layers (heads): search on every k-th column
    Ws, ss = W[:, ::stride], s[::stride]
    chunk = max(1, P_SEARCH_ELEMENTS // Ws.numel())  # bound the [chunk, R, N] temporaries
    errors = []
    for start in range(0, P_GRID + 1, chunk):
        sp = ss[None, None, :] * p[start : start + chunk, None, None]  # [c, 1, N]
        q = torch.clamp(torch.round(Ws[None] / sp), -zero, maxq - zero)
        errors.append(((q * sp - Ws[None]).abs() ** ERR_NORM).sum(dim=(1, 2)))
    best_p = p[torch.argmin(torch.cat(errors))]
    scale_max = (M * best_p).half()
    effective = ((qscale**2).half() * (scale_max.float() / 256).half()).float()  # fp16 roundings as the kernel
    return (qscale - 1).long(), scale_max, effective


def gptq_quantize(W: Tensor, Hp: PreparedHessian, plan: GroupPlan) -> GPTQResult:
    """Quantize W [N, K] (nn.Linear orientation) with the groups of `plan` (K rows, storage order)."""
    N, K = W.shape
    Np = pad_columns(N)
    Wq = torch.zeros(K, Np, device=W.device)  # work copy in storage order, columns padded with zeros
    Wq[:, :N] = W.float().T[Hp.perm]
    U = Hp.U
    codes = torch.zeros(K, Np, dtype=torch.uint8, device=W.device)  # 8 bits at most: a byte per code
    deq = torch.zeros(K, Np, device=W.device)
    Err = torch.zeros(K, Np, device=W.device)
    scale_codes, scale_max = [], []
    i1 = 0
    for bits, rows in plan.groups:
        i2, zero, maxq = i1 + rows, 2 ** (bits - 1), 2**bits - 1
        qscale, smax, s = find_scales(Wq[i1:i2], bits)
        scale_codes.append(qscale)
        scale_max.append(smax)
        s16 = s.half()
        for c in range(i1, i2):
            q = torch.clamp(torch.round(Wq[c] / s) + zero, 0, maxq)
            codes[c] = q.to(torch.uint8)
            deq[c] = ((q - zero).half() * s16).float()
            Err[c] = (Wq[c] - deq[c]) / U[c, c]
            Wq[c:i2].addr_(U[c, c:i2], Err[c], alpha=-1)  # rank-1 update, in place
        Wq[i2:].addmm_(U[i1:i2, i2:].T, Err[i1:i2], alpha=-1)
        i1 = i2
    weight = deq[torch.argsort(Hp.perm)][:, :N].T.contiguous()  # [N, K], original input order
    dW = weight - W.float()
    H = Hp.H.float()
    proxy = float(torch.sum((dW @ H) * dW) / torch.sum((W.float() @ H) * W.float()).clamp_min(1e-30))
    return GPTQResult(codes, torch.stack(scale_codes), torch.stack(scale_max), Hp.perm, weight, proxy)


def rtn_quantize(W: Tensor, plan: GroupPlan, H: Tensor | None = None) -> GPTQResult:
    """Round-to-nearest baseline: the same scales and grouping, no error feedback, no act-order."""
    K = W.shape[1]
    eye = torch.eye(K, device=W.device)
    Hp = PreparedHessian(torch.arange(K, device=W.device), eye, H if H is not None else eye)
    return gptq_quantize(W, Hp, plan)


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
