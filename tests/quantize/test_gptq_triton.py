"""The Triton GPTQ group kernels against the torch reference (under TRITON_INTERPRET=1 on a CPU)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from pixtral.exl2.format import GroupPlan  # noqa: E402
from quantize.gptq import gptq_quantize, prepare_hessian, quantize_group  # noqa: E402
from quantize.gptq_triton import triton_quantize_group  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _group(rows: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=gen) * torch.exp(0.5 * torch.randn(columns, generator=gen))
    X = torch.randn(4 * rows, rows, generator=gen) * torch.linspace(0.2, 2.0, rows)
    U = prepare_hessian(X.T @ X / X.shape[0]).U
    return W.to(DEVICE), U.to(DEVICE)


# every width, ragged group heights (2-bit groups step 16 rows, the others 32) and column counts
CASES = [
    (2, 16, 40),
    (2, 48, 70),
    (3, 32, 64),
    (3, 96, 33),
    (4, 64, 70),
    (4, 128, 40),
    (5, 32, 33),
    (6, 96, 64),
    (8, 128, 70),
    (8, 32, 40),
]


@pytest.mark.parametrize("bits,rows,columns", CASES)
def test_group_kernel_equals_the_reference(bits: int, rows: int, columns: int) -> None:
    W, U = _group(rows, columns, seed=bits * 1000 + rows)
    ref = quantize_group(W.clone(), U, bits)
    got = triton_quantize_group(W.clone(), U, bits)
    assert torch.equal(got.scale_code, ref.scale_code) and torch.equal(got.scale_max, ref.scale_max)
    same = (got.codes == ref.codes).float().mean()
    assert same >= 0.995, f"{same:.4f} of codes equal"
    assert (got.codes.int() - ref.codes.int()).abs().max() <= 1  # a fused multiply-add may move a code by one
    # where a code moved, the error fed to the rows below moves with it: compare the columns it left alone
    untouched = (got.codes == ref.codes).all(dim=0)
    torch.testing.assert_close(
        got.Err[:, untouched], ref.Err[:, untouched], atol=1e-4 * float(ref.Err.abs().max()), rtol=0
    )
    assert untouched.float().mean() >= 0.9


def test_a_whole_layer_through_the_kernel_matches(tmp_path) -> None:
    gen = torch.Generator().manual_seed(3)
    W = (torch.randn(64, 256, generator=gen) * 0.05).to(DEVICE)
    X = torch.randn(512, 256, generator=gen) * torch.linspace(0.1, 3.0, 256)
    Hp = prepare_hessian((X.T @ X / 512).to(DEVICE))
    plan = GroupPlan(((6, 64), (4, 128), (3, 64)))
    ref = gptq_quantize(W, Hp, plan, proxy=True)
    got = gptq_quantize(W, Hp, plan, group=triton_quantize_group, proxy=True)
    assert (got.codes == ref.codes).float().mean() >= 0.995
    assert got.proxy_error == pytest.approx(ref.proxy_error, rel=0.02)
