"""The d-sized passes: float64 accumulation of M = J J^T and of J^T c; Gramian validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from properties import dot_error_bound, gamma

import deconflict
from deconflict.gramian import combine_block, gramian_of_blocks, rounding_floor
from deconflict.linalg import as_gramian_array


def nearly_collinear_float32(d: int = 100_000, gap: float = 1e-5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(d, generator=generator, dtype=torch.float64)
    rows = [base + gap * torch.randn(d, generator=generator, dtype=torch.float64)
            for _ in range(3)]
    return torch.stack(rows).float()


def exact_gramian(J: torch.Tensor) -> torch.Tensor:
    """J J^T correctly rounded: float32 products are exact in float64, fsum adds them exactly."""
    rows = J.double().numpy()
    return torch.tensor([[math.fsum(a * b) for b in rows] for a in rows], dtype=torch.float64)


def test_float32_jacobian_gets_a_float64_accurate_gramian():
    """docs/methods.md#gramian: fp32 matmul loses projection methods; fp64 accumulation does not."""
    J = nearly_collinear_float32()
    exact = exact_gramian(J)
    ours = deconflict.gramian(J)
    assert ours.dtype == torch.float64
    # Float32 products are exact in float64, so any order of the d additions errs by at most
    # gamma_{d-1} sum |a_k b_k| (1.1e-11 relative here; the kernel's SIMD width and fused
    # multiply-adds change the error from machine to machine, never past this bound). A float32
    # accumulation loses 1e-8 and more, which the second assertion shows.
    bound = dot_error_bound(J, J, J.shape[1] - 1)
    assert ((ours - exact).abs().numpy() <= bound).all()
    naive = (J @ J.T).double()
    assert ((naive - exact).abs().max() / exact.abs().max()) > 1e-8  # what fp32 would lose
    assert 1e-8 * float(exact.abs().max()) > 100 * bound.max()  # and the bound tells them apart


def test_blocks_add_up_and_chunking_is_exact():
    J = torch.randn(4, 3_000_000, dtype=torch.float32)  # several column chunks
    whole = deconflict.gramian(J)
    blocks = gramian_of_blocks([J[:, :1000], J[:, 1000:]])
    # Two evaluations of the same n-term dot products in float64, in different orders, differ
    # by at most 2 gamma_n sum_k |a_k b_k| (a lost or doubled chunk would be off by O(1)).
    bound = torch.from_numpy(2 * dot_error_bound(J, J))
    assert ((blocks - whole).abs() <= bound).all()
    assert ((whole - J.double() @ J.double().T).abs() <= bound).all()


def test_combination_accumulates_in_float64():
    J = nearly_collinear_float32()
    c = torch.tensor([1e4, -2e4, 1e4 + 1.0], dtype=torch.float64)  # heavy cancellation
    reference = c @ J.double()
    exact = reference.float()
    ours = deconflict.combine(J, c)
    assert ours.dtype == torch.float32
    # Both sums are float64 (error <= gamma_3 sum_k |c_k J_k| each, 2e-12 here) rounded once to
    # float32: at most one float32 ulp apart. A float32 accumulation would err by
    # ~eps32 sum |c_k J_k| ~ 5e-3, four orders of magnitude above the ulp of these O(1) values.
    terms = (c.abs() @ J.double().abs()).numpy()
    ulp32 = float(torch.finfo(torch.float32).eps)
    allowed = 2 * gamma(3) * terms + ulp32 * np.abs(reference.numpy())
    assert ((ours.double() - exact.double()).abs().numpy() <= allowed).all()
    assert ulp32 * terms.max() > 1e3 * allowed.max()
    out = torch.ones(J.shape[1])
    combine_block(J, c, out=out)
    # One more term (the 1 already in out), then one rounding to float32.
    allowed = 2 * gamma(4) * (terms + 1) + ulp32 * np.abs(reference.numpy() + 1)
    assert ((out.double() - (reference + 1)).abs().numpy() <= allowed).all()


def test_rounding_floor_zeroes_pure_cancellation():
    J = torch.tensor([[0.3, 0.1], [-0.3, -0.1]], dtype=torch.float64)
    M = deconflict.gramian(J)
    c = torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert rounding_floor(M, c) > 0
    assert float(torch.linalg.vector_norm(deconflict.combine(J, c))) <= rounding_floor(M, c)


@pytest.mark.parametrize(
    ("matrix", "error", "message"),
    [
        (np.ones((2, 3)), deconflict.ShapeError, "square"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), deconflict.NonFiniteError, "rows \\[0, 1\\]"),
        (np.array([[1.0, 0.5], [0.2, 1.0]]), deconflict.InvalidGramianError, "not symmetric"),
        (np.array([[-1.0, 0.0], [0.0, 1.0]]), deconflict.InvalidGramianError, "negative"),
    ],
)
def test_invalid_gramians_are_rejected(matrix, error, message):
    with pytest.raises(error, match=message):
        as_gramian_array(matrix)


def test_jacobian_shape_is_checked():
    with pytest.raises(deconflict.ShapeError, match="2-D"):
        deconflict.aggregate(torch.ones(3), deconflict.GradOPS())
