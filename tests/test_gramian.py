"""The d-sized passes: float64 accumulation of M = J J^T and of J^T c; Gramian validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

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
    """METHODS.md: fp32 matmul loses projection methods; fp64 accumulation does not."""
    J = nearly_collinear_float32()
    exact = exact_gramian(J)
    ours = deconflict.gramian(J)
    assert ours.dtype == torch.float64
    assert ((ours - exact).abs().max() / exact.abs().max()) < 1e-15
    naive = (J @ J.T).double()
    assert ((naive - exact).abs().max() / exact.abs().max()) > 1e-8  # what fp32 would lose


def test_blocks_add_up_and_chunking_is_exact():
    J = torch.randn(4, 3_000_000, dtype=torch.float32)  # several column chunks
    whole = deconflict.gramian(J)
    blocks = gramian_of_blocks([J[:, :1000], J[:, 1000:]])
    # float64 sums of 3e6 terms differ by order at ~1e-13 of the largest entry.
    scale = float(whole.diagonal().max())
    torch.testing.assert_close(blocks, whole, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(whole, J.double() @ J.double().T, rtol=0, atol=1e-12 * scale)


def test_combination_accumulates_in_float64():
    J = nearly_collinear_float32()
    c = torch.tensor([1e4, -2e4, 1e4 + 1.0], dtype=torch.float64)  # heavy cancellation
    exact = (c @ J.double()).float()
    ours = deconflict.combine(J, c)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, exact, rtol=0, atol=0)
    out = torch.ones(J.shape[1])
    combine_block(J, c, out=out)
    torch.testing.assert_close(out, exact + 1, rtol=1e-6, atol=1e-6)


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
