"""The two passes over the Jacobian, as fused float64 kernels: M += J J^T and out (+)= J^T c.

J is given by its rows, g_1 .. g_T: a T x n tensor, or T separate 1-D tensors of n elements (the
per-task gradients as autograd returns them; stacking them would copy the Jacobian once more).
Each pass reads the rows once and converts float32 to float64 in the cache, so both results
carry float64 accuracy (docs/methods.md#gramian) at about the cost of reading J: no
float64 copy, no d-sized temporary. ``out`` may be a parameter's ``.grad`` itself.

Two implementations:

- "numba" (CPU rows of float32/float64 with unit stride): compiled loops. Each chunk of
  columns (sized to stay in the L1 cache) is converted to float64 once, into a buffer; the
  Gramian is then computed in 4 x 4 tiles of task pairs over that buffer: per column, 8 float64
  loads feed 16 fused multiply-adds. Only the upper triangle is computed (a diagonal tile needs
  10 of its 16 products) and a last group of 1 or 2 tasks gets narrow tiles instead of padding:
  at T = 10 that is the 55 products M needs per column instead of 96. Columns are split into
  fixed spans whose partial Gramians are summed in span order, so the result does not depend
  on the number of threads. Threads come from a small pool (the kernels release the GIL),
  sized by ``torch.get_num_threads()``. A contiguous T x n block is passed as one 2-D array;
  separate rows as a tuple padded to a power of two, so one compiled kernel serves every T up
  to that size. The combination J^T c adds the rows four at a time into a float64
  accumulator that stays in L1. A Gramian of 1 to 4 rows below the parallel size skips the
  buffer and the tiles: one pass over the rows, each element converted in a register and
  multiplied into the T (T + 1) / 2 sums it belongs to (at T = 3, d = 1e5 about a third of
  the tiled kernel's time, which pads 3 rows to a tile of 4 and copies every chunk).
- "torch" (any other device or dtype, or when numba is unavailable): float64 copies of column
  chunks, multiplied with ``torch.mm``. Correct everywhere; slower on the CPU because BLAS is
  poorly suited to T x T products with a long inner dimension.

``DECONFLICT_KERNELS=torch`` (read at import) forces the second, e.g. to compare them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor

numba: ModuleType | None
try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the library usable
    numba = None

Rows = Tensor | Sequence[Tensor]  # a T x n tensor, or T tensors of n elements

# Reassociation lets the compiler vectorize the reductions; contraction gives fused multiply-adds.
# NaN and infinity keep their IEEE meaning (no "fast" assumptions), so bad inputs still show.
_FLAGS = {"reassoc", "contract"}
_TILE = 4
# Columns per span (the unit of work and of the fixed summation order) and the cache budget of
# one chunk of T rows.
_SPAN = 1 << 15
_CHUNK_BYTES = 1 << 15
# Below this many elements, threads cost more than they save.
_PARALLEL_ELEMENTS = 1 << 20
# Columns per unit of work of the combination (a multiple of any cache line).
_COMBINE_UNIT = 4096
# Columns per chunk of the combination: its float64 accumulator (16 KiB) stays in L1.
_COMBINE_CHUNK = 2048
_COMPILED_DTYPES = (torch.float32, torch.float64)


def row_list(rows: Rows) -> list[Tensor]:
    """The rows as a list of 1-D tensors (views of a 2-D block, no copy).

    >>> import torch
    >>> row_list(torch.arange(6.0).reshape(2, 3))
    [tensor([0., 1., 2.]), tensor([3., 4., 5.])]
    """
    if isinstance(rows, Tensor):
        return list(rows.unbind(0))
    return [row.reshape(-1) for row in rows]


# Read once, at import: the check runs on every call of the lean paths, where reading the
# environment would be a tenth of the cost of aggregate(J, "mean") at d = 1e3.
_COMPILED = numba is not None and os.environ.get("DECONFLICT_KERNELS", "").lower() != "torch"


def compiled() -> bool:
    """Whether the compiled (numba) implementations run - these kernels, and the compiled T x T
    solves of ``solvers`` and IMTL-G: numba is installed and ``DECONFLICT_KERNELS=torch`` was
    not set, when deconflict was imported, to ask for the plain implementations."""
    return _COMPILED


def backend(tensors: Rows) -> str:
    """The implementation used for these rows: "numba" or "torch".

    >>> import torch
    >>> backend(torch.zeros(2, 3, dtype=torch.float16))   # not a numba dtype
    'torch'
    """
    rows = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    if not compiled():
        return "torch"
    first = rows[0]
    for row in rows:
        if (row.device.type != "cpu" or row.dtype not in (torch.float32, torch.float64)
                or row.dtype != first.dtype or row.is_conj() or row.is_neg()):
            return "torch"
    return "numba"


# ------------------------------------------------------------------------------- numba kernels
if numba is not None:

    @numba.njit(nogil=True, fastmath=_FLAGS, cache=True, inline="always")
    def _triangle_tile(buf, o, width, out):  # pragma: no cover - compiled
        # out[a, b] += sum_k B_{o+a}[k] B_{o+b}[k] for a <= b < 4: a diagonal tile of X X^T
        # needs 10 of its 16 products.
        x0 = buf[o]
        x1 = buf[o + 1]
        x2 = buf[o + 2]
        x3 = buf[o + 3]
        a00 = a01 = a02 = a03 = a11 = a12 = a13 = a22 = a23 = a33 = 0.0
        for k in range(width):
            u0 = x0[k]
            u1 = x1[k]
            u2 = x2[k]
            u3 = x3[k]
            a00 += u0 * u0
            a01 += u0 * u1
            a02 += u0 * u2
            a03 += u0 * u3
            a11 += u1 * u1
            a12 += u1 * u2
            a13 += u1 * u3
            a22 += u2 * u2
            a23 += u2 * u3
            a33 += u3 * u3
        out[0, 0] += a00
        out[0, 1] += a01
        out[0, 2] += a02
        out[0, 3] += a03
        out[1, 1] += a11
        out[1, 2] += a12
        out[1, 3] += a13
        out[2, 2] += a22
        out[2, 3] += a23
        out[3, 3] += a33

    @numba.njit(nogil=True, fastmath=_FLAGS, cache=True, inline="always")
    def _square_tile(buf, o, r, width, out):  # pragma: no cover - compiled
        # out[a, b] += sum_k B_{o+a}[k] B_{r+b}[k] for a, b < 4: 8 loads feed 16 multiply-adds.
        x0 = buf[o]
        x1 = buf[o + 1]
        x2 = buf[o + 2]
        x3 = buf[o + 3]
        y0 = buf[r]
        y1 = buf[r + 1]
        y2 = buf[r + 2]
        y3 = buf[r + 3]
        a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = 0.0
        a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = 0.0
        for k in range(width):
            u0 = x0[k]
            u1 = x1[k]
            u2 = x2[k]
            u3 = x3[k]
            v0 = y0[k]
            v1 = y1[k]
            v2 = y2[k]
            v3 = y3[k]
            a00 += u0 * v0
            a01 += u0 * v1
            a02 += u0 * v2
            a03 += u0 * v3
            a10 += u1 * v0
            a11 += u1 * v1
            a12 += u1 * v2
            a13 += u1 * v3
            a20 += u2 * v0
            a21 += u2 * v1
            a22 += u2 * v2
            a23 += u2 * v3
            a30 += u3 * v0
            a31 += u3 * v1
            a32 += u3 * v2
            a33 += u3 * v3
        out[0, 0] += a00
        out[0, 1] += a01
        out[0, 2] += a02
        out[0, 3] += a03
        out[1, 0] += a10
        out[1, 1] += a11
        out[1, 2] += a12
        out[1, 3] += a13
        out[2, 0] += a20
        out[2, 1] += a21
        out[2, 2] += a22
        out[2, 3] += a23
        out[3, 0] += a30
        out[3, 1] += a31
        out[3, 2] += a32
        out[3, 3] += a33

    @numba.njit(nogil=True, fastmath=_FLAGS, cache=True, inline="always")
    def _narrow_tile(buf, o, r, count, width, out):  # pragma: no cover - compiled
        # out[a, b] += sum_k B_{o+a}[k] B_{r+b}[k] for a < 4, b < count (1 or 2): the last,
        # partial group of rows against a full one, without products of padding.
        x0 = buf[o]
        x1 = buf[o + 1]
        x2 = buf[o + 2]
        x3 = buf[o + 3]
        y0 = buf[r]
        if count == 1:
            a00 = a10 = a20 = a30 = 0.0
            for k in range(width):
                v0 = y0[k]
                a00 += x0[k] * v0
                a10 += x1[k] * v0
                a20 += x2[k] * v0
                a30 += x3[k] * v0
            out[0, 0] += a00
            out[1, 0] += a10
            out[2, 0] += a20
            out[3, 0] += a30
            return
        y1 = buf[r + 1]
        a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = 0.0
        for k in range(width):
            u0 = x0[k]
            u1 = x1[k]
            u2 = x2[k]
            u3 = x3[k]
            v0 = y0[k]
            v1 = y1[k]
            a00 += u0 * v0
            a01 += u0 * v1
            a10 += u1 * v0
            a11 += u1 * v1
            a20 += u2 * v0
            a21 += u2 * v1
            a30 += u3 * v0
            a31 += u3 * v1
        out[0, 0] += a00
        out[0, 1] += a01
        out[1, 0] += a10
        out[1, 1] += a11
        out[2, 0] += a20
        out[2, 1] += a21
        out[3, 0] += a30
        out[3, 1] += a31

    @numba.njit(nogil=True, fastmath=_FLAGS, cache=True, inline="always")
    def _small_triangle(buf, o, count, width, out):  # pragma: no cover - compiled
        # The upper triangle of the last group's own products, for 1 or 2 rows.
        x0 = buf[o]
        if count == 1:
            a00 = 0.0
            for k in range(width):
                a00 += x0[k] * x0[k]
            out[0, 0] += a00
            return
        x1 = buf[o + 1]
        a00 = a01 = a11 = 0.0
        for k in range(width):
            u0 = x0[k]
            u1 = x1[k]
            a00 += u0 * u0
            a01 += u0 * u1
            a11 += u1 * u1
        out[0, 0] += a00
        out[0, 1] += a01
        out[1, 1] += a11

    @numba.njit(nogil=True, fastmath=_FLAGS, cache=True)
    def _product_spans(xs, x_count, ys, y_count, symmetric, columns, first, last, chunk,
                       partial):  # pragma: no cover - compiled
        # partial[s, p, q] (4 x 4) = tile (p, q) of span s's X Y^T, spans first:last (only
        # p <= q, and the upper triangle of p = q, when X Y^T is symmetric: X = Y).
        # Each chunk of columns is converted to float64 once, into a buffer that stays in the
        # cache (rows padded with zeros to whole tiles); the tiles then read float64 only.
        x_tiles = partial.shape[1]
        y_offset = 0 if symmetric else _TILE * x_tiles
        rows = y_offset + _TILE * partial.shape[2]
        # A last group of 1 or 2 rows gets kernels of its own (of 3, padding costs little).
        leftover = x_count % _TILE
        last_group = x_count // _TILE if symmetric and 0 < leftover < 3 else -1
        buf = np.zeros((rows, chunk))
        for s in range(first, last):
            span_start = s * _SPAN
            span_stop = min(columns, span_start + _SPAN)
            for start in range(span_start, span_stop, chunk):
                stop = min(span_stop, start + chunk)
                width = stop - start
                for i in range(x_count):
                    source = xs[i][start:stop]
                    target = buf[i]
                    for k in range(width):
                        target[k] = source[k]
                if not symmetric:
                    for i in range(y_count):
                        source = ys[i][start:stop]
                        target = buf[y_offset + i]
                        for k in range(width):
                            target[k] = source[k]
                for p in range(x_tiles):
                    if symmetric:
                        if p == last_group:
                            _small_triangle(buf, _TILE * p, leftover, width, partial[s, p, p])
                            continue
                        _triangle_tile(buf, _TILE * p, width, partial[s, p, p])
                        for q in range(p + 1, x_tiles):
                            if q == last_group:
                                _narrow_tile(buf, _TILE * p, _TILE * q, leftover, width,
                                             partial[s, p, q])
                            else:
                                _square_tile(buf, _TILE * p, _TILE * q, width,
                                             partial[s, p, q])
                    else:
                        for q in range(partial.shape[2]):
                            _square_tile(buf, _TILE * p, y_offset + _TILE * q, width,
                                         partial[s, p, q])

    @numba.njit(nogil=True, cache=True)
    def _add_spans(partial, x_count, y_count, symmetric, out):  # pragma: no cover - compiled
        # out += the sum of the spans' tiles, in span order (so the result does not depend on
        # how the spans were split among threads); symmetric: from the upper triangle.
        for i in range(x_count):
            for j in range(i if symmetric else 0, y_count):
                total = 0.0
                for s in range(partial.shape[0]):
                    total += partial[s, i // _TILE, j // _TILE, i % _TILE, j % _TILE]
                out[i, j] += total
                if symmetric and j != i:
                    out[j, i] += total

    @numba.njit(nogil=True, cache=True)
    def _products_serial(xs, x_count, ys, y_count, symmetric, columns, chunk, partial,
                         out):  # pragma: no cover - compiled
        # Every span on this thread, then the sum into out: one call for a small product.
        _product_spans(xs, x_count, ys, y_count, symmetric, columns, 0, partial.shape[0], chunk,
                       partial)
        _add_spans(partial, x_count, y_count, symmetric, out)

    @numba.njit(nogil=True, fastmath=_FLAGS, cache=True)
    def _small_gramian(xs, count, columns, out):  # pragma: no cover - compiled
        # out += X X^T for 1 to 4 rows, straight from the rows: each element is converted to
        # float64 in a register and feeds the count (count + 1) / 2 sums it takes part in, so
        # J is read once, with no buffer and no products of padding (a tile of 4 would do 10
        # products per column for 3 rows instead of 6).
        x0 = xs[0]
        if count == 1:
            a00 = 0.0
            for k in range(columns):
                u0 = np.float64(x0[k])
                a00 += u0 * u0
            out[0, 0] += a00
            return
        x1 = xs[1]
        if count == 2:
            a00 = a01 = a11 = 0.0
            for k in range(columns):
                u0 = np.float64(x0[k])
                u1 = np.float64(x1[k])
                a00 += u0 * u0
                a01 += u0 * u1
                a11 += u1 * u1
            out[0, 0] += a00
            out[0, 1] += a01
            out[1, 0] += a01
            out[1, 1] += a11
            return
        x2 = xs[2]
        if count == 3:
            a00 = a01 = a02 = a11 = a12 = a22 = 0.0
            for k in range(columns):
                u0 = np.float64(x0[k])
                u1 = np.float64(x1[k])
                u2 = np.float64(x2[k])
                a00 += u0 * u0
                a01 += u0 * u1
                a02 += u0 * u2
                a11 += u1 * u1
                a12 += u1 * u2
                a22 += u2 * u2
            out[0, 0] += a00
            out[0, 1] += a01
            out[0, 2] += a02
            out[1, 0] += a01
            out[1, 1] += a11
            out[1, 2] += a12
            out[2, 0] += a02
            out[2, 1] += a12
            out[2, 2] += a22
            return
        x3 = xs[3]
        a00 = a01 = a02 = a03 = a11 = a12 = a13 = a22 = a23 = a33 = 0.0
        for k in range(columns):
            u0 = np.float64(x0[k])
            u1 = np.float64(x1[k])
            u2 = np.float64(x2[k])
            u3 = np.float64(x3[k])
            a00 += u0 * u0
            a01 += u0 * u1
            a02 += u0 * u2
            a03 += u0 * u3
            a11 += u1 * u1
            a12 += u1 * u2
            a13 += u1 * u3
            a22 += u2 * u2
            a23 += u2 * u3
            a33 += u3 * u3
        out[0, 0] += a00
        out[0, 1] += a01
        out[0, 2] += a02
        out[0, 3] += a03
        out[1, 0] += a01
        out[1, 1] += a11
        out[1, 2] += a12
        out[1, 3] += a13
        out[2, 0] += a02
        out[2, 1] += a12
        out[2, 2] += a22
        out[2, 3] += a23
        out[3, 0] += a03
        out[3, 1] += a13
        out[3, 2] += a23
        out[3, 3] += a33

    @numba.njit(nogil=True, fastmath=_FLAGS, cache=True, inline="always")
    def _combine_direct(xs, count, weights, out, first, last, accumulate,
                        check):  # pragma: no cover - compiled
        # _combine_range for at most four rows: each element's float64 sum written straight into
        # out, with no accumulator to store and read back (20-25% less time at T = 3). The same
        # sums in the same order as through the accumulator, so the same rounded result.
        target = out[first:last]
        width = last - first
        r0 = xs[0][first:last]
        c0 = weights[0]
        if count == 1:
            for k in range(width):
                value = c0 * np.float64(r0[k])
                if accumulate:
                    value = np.float64(target[k]) + value
                target[k] = value
                check += target[k] - target[k]
            return check
        r1 = xs[1][first:last]
        c1 = weights[1]
        if count == 2:
            for k in range(width):
                value = c0 * np.float64(r0[k]) + c1 * np.float64(r1[k])
                if accumulate:
                    value = np.float64(target[k]) + value
                target[k] = value
                check += target[k] - target[k]
            return check
        r2 = xs[2][first:last]
        c2 = weights[2]
        if count == 3:
            for k in range(width):
                value = c0 * np.float64(r0[k]) + c1 * np.float64(r1[k]) + c2 * np.float64(r2[k])
                if accumulate:
                    value = np.float64(target[k]) + value
                target[k] = value
                check += target[k] - target[k]
            return check
        r3 = xs[3][first:last]
        c3 = weights[3]
        for k in range(width):
            value = (c0 * np.float64(r0[k]) + c1 * np.float64(r1[k]) + c2 * np.float64(r2[k])
                     + c3 * np.float64(r3[k]))
            if accumulate:
                value = np.float64(target[k]) + value
            target[k] = value
            check += target[k] - target[k]
        return check

    @numba.njit(nogil=True, fastmath=_FLAGS, cache=True)
    def _combine_range(xs, count, weights, out, first, last, chunk,
                       accumulate):  # pragma: no cover - compiled
        # out[first:last] (+)= sum_{i < count} weights[i] X_i[first:last], summed in float64.
        # Rows go in groups of four, so the float64 accumulator is read and written once per
        # four rows; at most four rows need none (``_combine_direct``). Returns the sum of
        # out[k] - out[k] over the written elements: 0 if they are all finite, NaN if one is
        # not (inf - inf is NaN) - the finiteness check for two operations per element in
        # out's dtype, in the pass that writes it, on the value as stored: an overflow of
        # float32 shows too.
        check = np.zeros(1, dtype=out.dtype)[0]  # in out's dtype: no conversion per element
        if count <= 4:
            return _combine_direct(xs, count, weights, out, first, last, accumulate, check)
        acc = np.empty(min(chunk, last - first))
        for start in range(first, last, chunk):
            stop = min(last, start + chunk)
            width = stop - start
            r0 = xs[0][start:stop]
            r1 = xs[1][start:stop]
            r2 = xs[2][start:stop]
            r3 = xs[3][start:stop]
            c0, c1, c2, c3 = weights[0], weights[1], weights[2], weights[3]
            for k in range(width):
                acc[k] = (c0 * np.float64(r0[k]) + c1 * np.float64(r1[k])
                          + c2 * np.float64(r2[k]) + c3 * np.float64(r3[k]))
            done = 4
            while done + 4 <= count:
                r0 = xs[done][start:stop]
                r1 = xs[done + 1][start:stop]
                r2 = xs[done + 2][start:stop]
                r3 = xs[done + 3][start:stop]
                c0, c1 = weights[done], weights[done + 1]
                c2, c3 = weights[done + 2], weights[done + 3]
                for k in range(width):
                    acc[k] += (c0 * np.float64(r0[k]) + c1 * np.float64(r1[k])
                               + c2 * np.float64(r2[k]) + c3 * np.float64(r3[k]))
                done += 4
            # The last one to three rows are added in the pass that writes out (one pass over
            # the accumulator fewer per row, ~13% less time at T = 10), in the same order.
            target = out[start:stop]
            left = count - done
            if left == 0:
                for k in range(width):
                    value = acc[k]
                    if accumulate:
                        value = np.float64(target[k]) + value
                    target[k] = value
                    check += target[k] - target[k]
                continue
            r0 = xs[done][start:stop]
            c0 = weights[done]
            if left == 1:
                for k in range(width):
                    value = acc[k] + c0 * np.float64(r0[k])
                    if accumulate:
                        value = np.float64(target[k]) + value
                    target[k] = value
                    check += target[k] - target[k]
                continue
            r1 = xs[done + 1][start:stop]
            c1 = weights[done + 1]
            if left == 2:
                for k in range(width):
                    value = acc[k] + c0 * np.float64(r0[k]) + c1 * np.float64(r1[k])
                    if accumulate:
                        value = np.float64(target[k]) + value
                    target[k] = value
                    check += target[k] - target[k]
                continue
            r2 = xs[done + 2][start:stop]
            c2 = weights[done + 2]
            for k in range(width):
                value = (acc[k] + c0 * np.float64(r0[k]) + c1 * np.float64(r1[k])
                         + c2 * np.float64(r2[k]))
                if accumulate:
                    value = np.float64(target[k]) + value
                target[k] = value
                check += target[k] - target[k]
        return check


# ------------------------------------------------------------------------------------ threads
_pool: ThreadPoolExecutor | None = None
_pool_owner: tuple[int, int] | None = None
_pool_lock = threading.Lock()


def _threads(count: int, elements: int) -> int:
    """Threads for ``count`` units of work over ``elements`` elements (1: stay on this one)."""
    if elements < _PARALLEL_ELEMENTS:
        return 1
    return min(torch.get_num_threads(), count)


def _run(work: Callable[[int, int], None], count: int, elements: int) -> None:
    """Call ``work(first, last)`` over a partition of range(count), on several threads if large."""
    threads = _threads(count, elements)
    if threads <= 1:
        work(0, count)
        return
    global _pool, _pool_owner
    with _pool_lock:
        # A forked child inherits the pool object but not its threads: make a new one.
        if _pool is None or _pool_owner != (os.getpid(), threads):
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="deconflict")
            _pool_owner = (os.getpid(), threads)
        pool = _pool
    bounds = [count * t // threads for t in range(threads + 1)]
    futures = [pool.submit(work, bounds[t], bounds[t + 1]) for t in range(threads)]
    for future in futures:
        future.result()


def _compiled_input(rows: Rows) -> tuple[Any, int, int] | None:
    """The rows as the compiled kernels take them, with their count and length, or None when
    the torch implementation must run (``backend``; rows without unit stride).

    A C-contiguous T x n tensor goes as one 2-D array; separate rows as a tuple of 1-D arrays
    (NumPy views, no copy), padded with the last one to a power of two (at least 4), so one
    compiled kernel per padded length serves every T up to it (the padding is never read).
    """
    if isinstance(rows, Tensor):
        if rows.ndim != 2:
            raise ValueError(f"a block of rows must be 2-D, got shape {tuple(rows.shape)}")
        if rows.shape[0] == 0:
            raise ValueError("no rows")
        if (not compiled() or rows.device.type != "cpu"
                or rows.dtype not in _COMPILED_DTYPES or rows.is_conj() or rows.is_neg()):
            return None
        if rows.is_contiguous():
            return rows.detach().numpy(), rows.shape[0], rows.shape[1]
        listed = list(rows.unbind(0))
    else:
        listed = [row.reshape(-1) for row in rows]
        if not listed:
            raise ValueError("no rows")
    width = listed[0].numel()
    first = listed[0]
    for row in listed:
        if row.numel() != width:
            raise ValueError(f"rows of different lengths: {sorted({r.numel() for r in listed})}")
    if not compiled():
        return None
    for row in listed:
        if (row.device.type != "cpu" or row.dtype != first.dtype
                or first.dtype not in _COMPILED_DTYPES or row.is_conj() or row.is_neg()
                or (row.stride(0) != 1 and width > 1)):
            return None
    arrays = [row.detach().numpy() for row in listed]
    size = max(_TILE, 1 << (len(arrays) - 1).bit_length())
    return tuple(arrays + [arrays[-1]] * (size - len(arrays))), len(arrays), width


def _chunk(rows: int, columns: int) -> int:
    """Columns per chunk: the float64 buffer of ``rows`` rows stays in the cache."""
    chunk = max(256, min(_SPAN, _CHUNK_BYTES // (rows * 8) // 64 * 64))
    return int(min(chunk, max(columns, 1)))


def _checked_rows(rows: Rows) -> list[Tensor]:
    listed = row_list(rows)
    if not listed:
        raise ValueError("no rows")
    width = listed[0].numel()
    if any(row.numel() != width for row in listed):
        raise ValueError(f"rows of different lengths: {sorted({r.numel() for r in listed})}")
    return listed


# ------------------------------------------------------------------------------------ Gramian
def gramian_into(rows: Rows, out: Tensor) -> None:
    """out += J J^T for the rows of J, accumulated in float64 (``out``: T x T float64).

    The rows may be separate tensors, as autograd returns them, so J is never stacked:

    >>> import torch
    >>> out = torch.zeros(2, 2, dtype=torch.float64)
    >>> gramian_into([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])], out)
    >>> out
    tensor([[ 1., -1.],
            [-1.,  2.]], dtype=torch.float64)
    """
    compiled = _compiled_input(rows)
    if compiled is None or out.device.type != "cpu":
        listed = _checked_rows(rows)
        if listed[0].numel():
            _torch_products_into(listed, listed, out, symmetric=True)
        return
    xs, count, columns = compiled
    if columns:
        _products_into(xs, count, xs, count, columns, out, symmetric=True)


def cross_into(left: Rows, right: Rows, out: Tensor) -> None:
    """out += A B^T for the rows of A (T x n) and of B (U x n), accumulated in float64.

    >>> import torch
    >>> out = torch.zeros(1, 2, dtype=torch.float64)
    >>> cross_into(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), out)
    >>> out
    tensor([[1., 2.]], dtype=torch.float64)
    """
    a, b = _compiled_input(left), _compiled_input(right)
    if a is None or b is None or a[0].dtype != b[0].dtype or out.device.type != "cpu":
        la, lb = _checked_rows(left), _checked_rows(right)
        if la[0].numel() != lb[0].numel():
            raise ValueError(f"rows of {la[0].numel()} and {lb[0].numel()} elements")
        if la[0].numel():
            _torch_products_into(la, lb, out, symmetric=False)
        return
    if a[2] != b[2]:
        raise ValueError(f"rows of {a[2]} and {b[2]} elements")
    if a[2]:
        _products_into(a[0], a[1], b[0], b[1], a[2], out, symmetric=False)


def matrix_gramian(rows: np.ndarray) -> np.ndarray:
    """J J^T (float64) of a C-contiguous float32/float64 T x n array, with no checks: the
    lean path of ``aggregate`` (the caller has checked the array; ``compiled_matrix``).

    >>> import numpy as np
    >>> matrix_gramian(np.array([[1.0, 0.0], [-1.0, 1.0]], dtype=np.float32))
    array([[ 1., -1.],
           [-1.,  2.]])
    """
    count, columns = rows.shape
    out = np.zeros((count, count))
    if columns:
        _products_into(rows, count, rows, count, columns, out, symmetric=True)
    return out


def matrix_combine(rows: np.ndarray, weights: np.ndarray, out: np.ndarray) -> bool:
    """out = J^T c for a C-contiguous T x n array (float64 sums, rounded once into the
    contiguous ``out`` of n elements), with no checks of its inputs: the lean path of
    ``aggregate``. Returns whether every element of ``out`` is finite (checked in the same pass:
    a NaN or infinity in J or c, or an overflow of out's dtype, leaves a non-finite element).

    >>> import numpy as np
    >>> out = np.empty(2, dtype=np.float32)
    >>> matrix_combine(np.array([[1, 2], [3, 4]], dtype=np.float32), np.array([1.0, -1.0]), out)
    True
    >>> out
    array([-2., -2.], dtype=float32)
    """
    count, columns = rows.shape
    if columns == 0:
        return True
    units = -(-columns // _COMBINE_UNIT)
    if _threads(units, count * columns) <= 1:
        return _combine_range(rows, count, weights, out, 0, columns, _COMBINE_CHUNK, False) == 0
    checks: list[float] = []

    def work(first: int, last: int) -> None:
        checks.append(_combine_range(rows, count, weights, out, first * _COMBINE_UNIT,
                                     min(columns, last * _COMBINE_UNIT), _COMBINE_CHUNK, False))

    _run(work, units, count * columns)
    return all(check == 0 for check in checks)


def compiled_matrix(jacobian: Tensor) -> np.ndarray | None:
    """A 2-D tensor as the array ``matrix_gramian`` and ``matrix_combine`` take (a view), or
    None if the compiled kernels cannot read it as it is."""
    # is_cpu rather than device.type, and no detach where no gradient is tracked: each saves
    # a few hundred ns of the per-call cost of ``aggregate`` at small d.
    if (not _COMPILED or jacobian.ndim != 2 or not jacobian.is_cpu or jacobian.shape[0] == 0
            or jacobian.dtype not in _COMPILED_DTYPES or not jacobian.is_contiguous()
            or jacobian.is_neg()):
        return None
    return (jacobian.detach() if jacobian.requires_grad else jacobian).numpy()


def _products_into(xs: Any, x_count: int, ys: Any, y_count: int, columns: int,
                   out: Tensor | np.ndarray, *, symmetric: bool) -> None:
    """out += X Y^T in float64 by the tiled kernel (X = Y when ``symmetric``), or, for a
    Gramian of at most 4 rows below the parallel size, in one direct pass (``_small_gramian``).
    """
    if isinstance(out, np.ndarray):
        direct, target = True, out
    else:
        direct = out.dtype == torch.float64 and out.is_contiguous()
        target = out.detach().numpy() if direct else np.zeros((x_count, y_count))
    elements = (x_count + (0 if symmetric else y_count)) * columns
    if symmetric and x_count <= _TILE and elements < _PARALLEL_ELEMENTS:
        # Chosen by the shape alone, so the result still does not depend on the number of
        # threads (the tiled kernel goes parallel only above _PARALLEL_ELEMENTS anyway).
        _small_gramian(xs, x_count, columns, target)
    else:
        spans = -(-columns // _SPAN)
        x_tiles = -(-x_count // _TILE)
        y_tiles = x_tiles if symmetric else -(-y_count // _TILE)
        partial = np.zeros((spans, x_tiles, y_tiles, _TILE, _TILE))
        chunk = _chunk(_TILE * (x_tiles + (0 if symmetric else y_tiles)), columns)
        if _threads(spans, elements) <= 1:
            _products_serial(xs, x_count, ys, y_count, symmetric, columns, chunk, partial,
                             target)
        else:
            def work(first: int, last: int) -> None:
                _product_spans(xs, x_count, ys, y_count, symmetric, columns, first, last,
                               chunk, partial)

            _run(work, spans, elements)
            _add_spans(partial, x_count, y_count, symmetric, target)
    if not direct:
        assert isinstance(out, Tensor)
        out += torch.from_numpy(target)


def _torch_products_into(left: list[Tensor], right: list[Tensor], out: Tensor, *,
                         symmetric: bool) -> None:
    part = torch.zeros(len(left), len(right), dtype=torch.float64, device=out.device)
    step = max(256, (1 << 19) // max(len(left), len(right)))
    for start in range(0, left[0].numel(), step):
        a = torch.stack([row[start:start + step] for row in left]).to(out.device, torch.float64)
        b = a if symmetric else torch.stack([row[start:start + step] for row in right]).to(
            out.device, torch.float64)
        part.addmm_(a, b.T)
    out += (part + part.T) / 2 if symmetric else part  # exactly symmetric, like the kernel's


# -------------------------------------------------------------------------------- combination
def combine_into(rows: Rows, weights: Tensor, out: Tensor, *, accumulate: bool) -> None:
    """out (+)= J^T c for the rows of J, summed in float64 and rounded once into ``out``.

    ``out`` holds n elements (any shape, contiguous: e.g. a parameter's ``.grad``);
    ``accumulate`` adds to it, otherwise it is overwritten.

    >>> import torch
    >>> grad = torch.ones(2)
    >>> J = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    >>> combine_into(J, torch.tensor([1.0, 0.5]), grad, accumulate=True)
    >>> grad
    tensor([1.5000, 1.5000])
    """
    compiled = _compiled_input(rows)
    flat_out = out.view(-1)
    if compiled is None or not (out.device.type == "cpu" and out.dtype in _COMPILED_DTYPES
                                and out.is_contiguous()):
        listed = _checked_rows(rows)
        if listed[0].numel():
            c = weights.detach().to(device="cpu", dtype=torch.float64)
            _torch_combine_into(listed, c, flat_out, accumulate)
        return
    xs, count, columns = compiled
    if flat_out.numel() != columns:
        raise ValueError(f"out has {flat_out.numel()} elements, the rows {columns}")
    if columns == 0:
        return
    c = weights.detach()
    if c.dtype != torch.float64 or c.device.type != "cpu" or not c.is_contiguous():
        c = c.to(device="cpu", dtype=torch.float64).contiguous()
    target = flat_out.detach().numpy()
    weights_np = c.numpy()
    units = -(-columns // _COMBINE_UNIT)
    if _threads(units, count * columns) <= 1:
        _combine_range(xs, count, weights_np, target, 0, columns, _COMBINE_CHUNK, accumulate)
        return

    def work(first: int, last: int) -> None:
        # Whole units, so thread boundaries never split a cache line of ``out``.
        _combine_range(xs, count, weights_np, target, first * _COMBINE_UNIT,
                       min(columns, last * _COMBINE_UNIT), _COMBINE_CHUNK, accumulate)

    _run(work, units, count * columns)


def _torch_combine_into(rows: list[Tensor], c: Tensor, flat_out: Tensor,
                        accumulate: bool) -> None:
    c = c.to(flat_out.device)
    step = max(256, (1 << 19) // len(rows))
    for start in range(0, rows[0].numel(), step):
        part = torch.zeros(min(step, rows[0].numel() - start), dtype=torch.float64,
                           device=flat_out.device)
        for weight, row in zip(c, rows, strict=True):
            part += weight * row[start:start + step].to(flat_out.device, torch.float64)
        target = flat_out[start:start + step]
        if accumulate:
            part += target.to(torch.float64)
        target.copy_(part)
