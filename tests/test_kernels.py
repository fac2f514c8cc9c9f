"""The fused float64 kernels: exact against correctly rounded sums, on every path and layout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from properties import dot_error_bound, gamma

from deconflict import kernels

SPAN = kernels._SPAN


def exact_products(A: torch.Tensor, B: torch.Tensor) -> np.ndarray:
    """A B^T correctly rounded: float32/float64 products are summed exactly by fsum."""
    a, b = A.double().numpy(), B.double().numpy()
    if A.dtype == torch.float32:
        return np.array([[math.fsum(x * y) for y in b] for x in a])
    # float64 products are not exact: split each factor into halves that multiply exactly.
    return np.array([[_exact_dot(x, y) for y in b] for x in a])


def _exact_dot(x: np.ndarray, y: np.ndarray) -> float:
    def split(v):
        high = (v * 134217729.0) - ((v * 134217729.0) - v)  # Dekker's split, 27 bits
        return high, v - high

    xh, xl = split(x)
    yh, yl = split(y)
    return math.fsum(np.concatenate([xh * yh, xh * yl, xl * yh, xl * yl]))


def relative_error(ours: np.ndarray, exact: np.ndarray, A: torch.Tensor, B: torch.Tensor) -> float:
    """The largest error in units of its worst-case bound gamma_n sum_k |a_k b_k| (<= 1 on any
    IEEE machine, whatever the SIMD width or fused multiply-adds; ``properties.gamma``).

    A float32 accumulation errs by ~1e-7 |a| |b| and more, at least 3e4 units here
    (n <= 32771 columns: gamma_n <= 3.7e-12).
    """
    bound = dot_error_bound(A.double(), B.double())
    return float(np.max(np.abs(ours - exact) / np.maximum(bound, 1e-300)))


@pytest.fixture(params=["numba", "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(kernels, "_COMPILED", False)  # as DECONFLICT_KERNELS=torch does
    return request.param


# 1, 2, 5, 6, 9, 10, 13, 17 rows: a last group of 1 or 2 tasks (the narrow tiles), with and
# without full groups before it; 3, 4: padded and full tiles.
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 9, 10, 13, 17])
@pytest.mark.parametrize("columns", [1, 7, 300, SPAN + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gramian_is_float64_accurate(backend, rows, columns, dtype):
    generator = torch.Generator().manual_seed(rows * 1000 + columns)
    J = torch.randn(rows, columns, generator=generator, dtype=dtype)
    assert kernels.backend(J) == backend
    M = torch.zeros(rows, rows, dtype=torch.float64)
    kernels.gramian_into(J, M)
    assert relative_error(M.numpy(), exact_products(J, J), J, J) <= 1
    assert torch.equal(M, M.T)


@pytest.mark.parametrize(("rows", "other"), [(1, 1), (3, 5), (10, 10), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_products_are_float64_accurate(backend, rows, other, dtype):
    generator = torch.Generator().manual_seed(rows + 10 * other)
    A = torch.randn(rows, 2 * SPAN + 5, generator=generator, dtype=dtype)
    B = torch.randn(other, 2 * SPAN + 5, generator=generator, dtype=dtype)
    out = torch.zeros(rows, other, dtype=torch.float64)
    kernels.cross_into(A, B, out)
    assert relative_error(out.numpy(), exact_products(A, B), A, B) <= 1


def test_gramian_accumulates_into_out():
    J = torch.randn(3, 50)
    M = torch.eye(3, dtype=torch.float64)
    kernels.gramian_into(J, M)
    # 50 products and the 1 already there, against a BLAS evaluation: 2 gamma_51 of the terms.
    reference = torch.eye(3, dtype=torch.float64) + J.double() @ J.double().T
    allowed = 2 * (dot_error_bound(J.double(), J.double(), 51) + gamma(51) * np.eye(3))
    assert (np.abs((M - reference).numpy()) <= allowed).all()


# 1-4 rows take the one-pass kernel; from 5, groups of four then 1 (5), 0 (8), 2 (10) or 3 (11)
# rows added in the pass that writes out.
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 10, 11])
@pytest.mark.parametrize("columns", [1, 5000, 70_001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_combination_is_rounded_once_from_float64(backend, rows, columns, dtype):
    generator = torch.Generator().manual_seed(rows + columns)
    J = torch.randn(rows, columns, generator=generator, dtype=dtype)
    # Large coefficients of opposite signs: the cancellation a float32 sum would lose.
    c = torch.randn(rows, generator=generator, dtype=torch.float64) * 1e4
    exact = (c @ J.double()).numpy()
    out = torch.full((columns,), float("nan"), dtype=dtype)
    kernels.combine_into(J, c, out, accumulate=False)
    terms = (c.abs() @ J.double().abs()).numpy()
    # Ours and torch's float64 sums of ``rows`` products each err by gamma_rows of the terms;
    # ours is then rounded once to ``dtype`` (half an ulp, eps/2 relative).
    ulp = float(torch.finfo(dtype).eps)
    assert (np.abs(out.double().numpy() - exact)
            <= 2 * gamma(rows) * terms * (1 + ulp) + ulp / 2 * np.abs(exact)).all()
    scale = float(terms.max())
    # Accumulating adds to what is there, with one rounding of the float64 sum.
    base = torch.randn(columns, generator=generator, dtype=dtype)
    total = base.clone()
    kernels.combine_into(J, c, total, accumulate=True)
    expected = torch.from_numpy(exact + base.double().numpy()).to(dtype)
    # The same sums plus one term (the base), each rounded once to dtype: one ulp apart at most.
    torch.testing.assert_close(total, expected, rtol=ulp, atol=2 * gamma(rows + 1) * scale)


def test_strided_rows_and_columns():
    """Row views of a larger buffer go to the compiled kernel; column-strided blocks fall back."""
    buffer = torch.randn(7, 900)
    rows_view = buffer[1:6, 100:800]
    assert rows_view.stride() == (900, 1)
    M = torch.zeros(5, 5, dtype=torch.float64)
    kernels.gramian_into(rows_view, M)
    exact = exact_products(rows_view, rows_view)
    assert relative_error(M.numpy(), exact, rows_view, rows_view) <= 1
    transposed = torch.randn(700, 5).T  # column stride 5
    M = torch.zeros(5, 5, dtype=torch.float64)
    kernels.gramian_into(transposed, M)
    assert relative_error(M.numpy(), exact_products(transposed, transposed), transposed,
                          transposed) <= 1
    c = torch.randn(5, dtype=torch.float64)
    out = torch.empty(700)
    kernels.combine_into(transposed, c, out, accumulate=False)
    torch.testing.assert_close(out, (c @ transposed.double()).float())


def test_results_do_not_depend_on_the_number_of_threads():
    # Above the size where the kernels go parallel (``_PARALLEL_ELEMENTS``).
    J = torch.randn(10, max(3 * SPAN + 11, kernels._PARALLEL_ELEMENTS // 10 + 5))
    c = torch.randn(10, dtype=torch.float64)
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            M = torch.zeros(10, 10, dtype=torch.float64)
            kernels.gramian_into(J, M)
            out = torch.empty(J.shape[1])
            kernels.combine_into(J, c, out, accumulate=False)
            results.append((M, out))
    finally:
        torch.set_num_threads(previous)
    for M, out in results[1:]:
        assert torch.equal(M, results[0][0]) and torch.equal(out, results[0][1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_entries_reach_the_gramian(backend, bad):
    J = torch.randn(3, 1000)
    J[1, 517] = bad
    M = torch.zeros(3, 3, dtype=torch.float64)
    kernels.gramian_into(J, M)
    assert not bool(torch.isfinite(M[1, 1]))
    assert bool(torch.isfinite(M[0, 2]))


@given(rows=st.integers(1, 12), columns=st.integers(1, 3000), seed=st.integers(0, 2**31 - 1),
       scale=st.sampled_from([1e-30, 1.0, 1e30]))
def test_fuzzed_blocks_match_numpy(rows, columns, seed, scale):
    rng = np.random.default_rng(seed)
    J = torch.from_numpy((rng.standard_normal((rows, columns)) * scale).astype(np.float32))
    M = torch.zeros(rows, rows, dtype=torch.float64)
    kernels.gramian_into(J, M)
    reference = J.double().numpy() @ J.double().numpy().T
    # Two float64 evaluations (ours, NumPy's BLAS) of the same dot products: 2 gamma_n apart.
    assert np.all(np.abs(M.numpy() - reference) <= 2 * dot_error_bound(J.double(), J.double()))
    c = torch.from_numpy(rng.standard_normal(rows))
    out = torch.empty(columns)
    kernels.combine_into(J, c, out, accumulate=False)
    # Two float64 sums of ``rows`` terms, 2 gamma_rows of |c| |J| apart, each rounded once to
    # float32: at most one float32 ulp more.
    exact = c @ J.double()
    allowed = (2 * gamma(rows) * (c.abs() @ J.double().abs())
               + float(torch.finfo(torch.float32).eps) * exact.abs())
    assert bool(((out.double() - exact).abs() <= allowed).all())


@given(rows=st.integers(1, 12), columns=st.integers(0, 2000), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_the_matrix_entry_points_match_the_general_ones(rows, columns, seed, dtype):
    """``matrix_gramian`` / ``matrix_combine`` (the lean path of ``aggregate``) give exactly
    the results of ``gramian_into`` / ``combine_into`` on separate rows: the same kernels, in
    the same order of operations."""
    generator = torch.Generator().manual_seed(seed)
    J = torch.randn(rows, columns, generator=generator, dtype=dtype)
    array = kernels.compiled_matrix(J)
    assert array is not None
    M = torch.zeros(rows, rows, dtype=torch.float64)
    kernels.gramian_into(list(J.unbind(0)), M)
    assert np.array_equal(kernels.matrix_gramian(array), M.numpy())
    c = torch.randn(rows, generator=generator, dtype=torch.float64)
    expected = torch.empty(columns, dtype=dtype)
    kernels.combine_into(list(J.unbind(0)), c, expected, accumulate=False)
    out = np.empty(columns, dtype=array.dtype)
    kernels.matrix_combine(array, c.numpy(), out)
    assert np.array_equal(out, expected.numpy())


@given(rows=st.integers(1, 9), columns=st.integers(1, 3000), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([np.float32, np.float64]),
       bad=st.sampled_from([None, math.nan, math.inf, -math.inf, 3e38, 1e308]))
def test_matrix_combine_reports_whether_its_output_is_finite(rows, columns, seed, dtype, bad):
    """The finiteness check fused into ``matrix_combine`` (``aggregate``'s sum and mean rely
    on it): True exactly when every written element is finite - a NaN or infinity in J, or a
    float64 sum beyond out's dtype (3e38 times a weight above 1.14 in float32; 1e308 in both)."""
    generator = np.random.default_rng(seed)
    J = generator.standard_normal((rows, columns)).astype(dtype)
    c = 2 * generator.standard_normal(rows)
    if bad is not None:
        with np.errstate(over="ignore"):  # 1e308 is infinite in float32
            J[generator.integers(rows), generator.integers(columns)] = bad
    out = np.empty(columns, dtype=dtype)
    assert kernels.matrix_combine(J, c, out) == bool(np.isfinite(out).all())


@pytest.mark.parametrize("threads", [1, 2])
def test_matrix_combine_finds_a_nan_in_any_thread_share(threads):
    """Above the parallel size each thread checks its own columns: a NaN in the last column
    (the last thread's share) is reported as in the first."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        columns = 2 * kernels._PARALLEL_ELEMENTS
        for where in (0, columns - 1):
            J = np.ones((2, columns), dtype=np.float32)
            out = np.empty(columns, dtype=np.float32)
            assert kernels.matrix_combine(J, np.ones(2), out)
            J[1, where] = math.nan
            assert not kernels.matrix_combine(J, np.ones(2), out)
    finally:
        torch.set_num_threads(previous)


def test_compiled_matrix_refuses_what_the_kernels_cannot_read():
    assert kernels.compiled_matrix(torch.randn(5, 3).T) is None  # column stride 5
    assert kernels.compiled_matrix(torch.randn(3, 4, dtype=torch.float16)) is None
    assert kernels.compiled_matrix(torch.randn(0, 4)) is None
    assert kernels.compiled_matrix(torch.randn(4)) is None


def test_the_lean_path_of_aggregate_equals_the_general_one():
    """``aggregate`` on a whole Jacobian takes ``update.matrix_update``; with ``block_sizes``
    it takes ``compute_update``. Both must give the same update, bit for bit, for every method
    that weighs by the Gramian (a fresh instance each: some keep state)."""
    import deconflict
    from deconflict.methods.registry import available
    from deconflict.update import weighs_by_gramian

    generator = torch.Generator().manual_seed(0)
    J = torch.randn(4, 300, generator=generator)
    J[1] = -0.5 * J[0] + 0.1 * J[1]  # a conflict, so the projections have work to do
    losses = torch.rand(4, generator=generator) + 0.5
    checked = 0
    for name in available():
        # A fixed seed for the methods that sample (the same draws on both paths).
        seeded = {"seed": 0} if "seed" in deconflict.get(name).options() else {}
        method = deconflict.get(name, **seeded)
        if not weighs_by_gramian(method):
            continue
        lean = deconflict.aggregate(J, method, losses=losses)
        general = deconflict.aggregate(J, deconflict.get(name, **seeded), losses=losses,
                                       block_sizes=[J.shape[1]])
        assert torch.equal(lean, general), name
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("side", [-1, 1])
def test_small_gramians_on_both_sides_of_the_direct_pass(rows, side):
    """Up to 4 rows below ``_PARALLEL_ELEMENTS`` the Gramian is one direct pass
    (``_small_gramian``), above it the tiled kernel: both within gamma_n of the exact sums, as
    whole blocks, as separate rows and as the rows of a wider matrix (not contiguous as a
    block, each row contiguous)."""
    columns = kernels._PARALLEL_ELEMENTS // rows + side * 7
    generator = torch.Generator().manual_seed(rows * 10 + side)
    wide = torch.randn(rows, columns + 5, generator=generator)
    J = wide[:, :columns].contiguous()
    exact = exact_products(J, J)
    for layout in (J, list(J.unbind(0)), wide[:, :columns]):
        M = torch.zeros(rows, rows, dtype=torch.float64)
        kernels.gramian_into(layout, M)
        assert relative_error(M.numpy(), exact, J, J) <= 1
        assert torch.equal(M, M.T)
    array = kernels.compiled_matrix(J)
    assert array is not None
    assert relative_error(kernels.matrix_gramian(array), exact, J, J) <= 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_small_gramians_of_every_dtype(dtype, bad):
    """3 rows of every dtype: float64 through the direct pass, half precision through the torch
    path; a NaN or infinity reaches its row's diagonal entry."""
    generator = torch.Generator().manual_seed(5)
    J = torch.randn(3, 1001, generator=generator).to(dtype)
    if bad is not None:
        J[2, 500] = bad
    M = torch.zeros(3, 3, dtype=torch.float64)
    kernels.gramian_into(J, M)
    if bad is not None:
        assert not bool(torch.isfinite(M[2, 2])) and bool(torch.isfinite(M[0, 1]))
        return
    exact = exact_products(J.double(), J.double()) if dtype != torch.float64 else (
        exact_products(J, J))
    assert relative_error(M.numpy(), exact, J.double(), J.double()) <= 1
