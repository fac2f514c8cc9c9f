"""The two passes over the Jacobian, as fused float64 kernels: M += J J^T and out (+)= J^T c.

J is given by its rows, g_1 .. g_T: a T x n tensor, or T separate 1-D tensors of n elements (the
per-task gradients as autograd returns them; stacking them would copy the Jacobian once more).
Each pass reads the rows once and converts float32 to float64 in registers, so both results
carry float64 accuracy (docs/methods.md#gramian) at about the cost of reading J: no
float64 copy, no d-sized temporary. ``out`` may be a parameter's ``.grad`` itself.

Two implementations:

- "numba" (CPU rows of float32/float64 with unit stride): compiled loops. The Gramian is
  computed in 4 x 4 tiles of task pairs over column chunks that stay in the L1/L2 cache: per
  column, 8 loads feed 16 fused multiply-adds, so a tile runs at the speed of the arithmetic
  while the rows are read from memory once. Columns are split into fixed spans whose partial
  Gramians are summed in span order, so the result does not depend on the number of threads.
  Threads come from a small pool (the kernels release the GIL), sized by
  ``torch.get_num_threads()``. Rows are passed as a tuple padded to a power of two, so one
  compiled kernel serves every T up to that size.
- "torch" (any other device or dtype, or when numba is unavailable): float64 copies of column
  chunks, multiplied with ``torch.mm``. Correct everywhere; slower on the CPU because BLAS is
  poorly suited to T x T products with a long inner dimension.

``DECONFLICT_KERNELS=torch`` forces the second, e.g. to compare them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

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
_CHUNK_BYTES = 1 << 17
# Below this many elements, threads cost more than they save.
_PARALLEL_ELEMENTS = 1 << 20
# Columns per unit of work of the combination (a multiple of any cache line).
_COMBINE_UNIT = 4096


def row_list(rows: Rows) -> list[Tensor]:
    """The rows as a list of 1-D tensors (views of a 2-D block, no copy).

    >>> import torch
    >>> row_list(torch.arange(6.0).reshape(2, 3))
    [tensor([0., 1., 2.]), tensor([3., 4., 5.])]
    """
    if isinstance(rows, Tensor):
        return list(rows.unbind(0))
    return [row.reshape(-1) for row in rows]


def backend(tensors: Rows) -> str:
    """The implementation used for these rows: "numba" or "torch".

    >>> import torch
    >>> backend(torch.zeros(2, 3, dtype=torch.float16))   # not a numba dtype
    'torch'
    """
    rows = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    if numba is None or os.environ.get("DECONFLICT_KERNELS", "").lower() == "torch":
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
    def _tile(xs, x_rows, p, ys, y_rows, q, start, stop, out):  # pragma: no cover - compiled
        # out[a, b] += sum_k X_{x_rows[4p + a]}[k] Y_{y_rows[4q + b]}[k], columns start:stop.
        o = 4 * p
        x0 = xs[x_rows[o]][start:stop]
        x1 = xs[x_rows[o + 1]][start:stop]
        x2 = xs[x_rows[o + 2]][start:stop]
        x3 = xs[x_rows[o + 3]][start:stop]
        o = 4 * q
        y0 = ys[y_rows[o]][start:stop]
        y1 = ys[y_rows[o + 1]][start:stop]
        y2 = ys[y_rows[o + 2]][start:stop]
        y3 = ys[y_rows[o + 3]][start:stop]
        a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = 0.0
        a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = 0.0
        for k in range(stop - start):
            u0 = np.float64(x0[k])
            u1 = np.float64(x1[k])
            u2 = np.float64(x2[k])
            u3 = np.float64(x3[k])
            v0 = np.float64(y0[k])
            v1 = np.float64(y1[k])
            v2 = np.float64(y2[k])
            v3 = np.float64(y3[k])
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

    @numba.njit(nogil=True, fastmath=_FLAGS, cache=True)
    def _product_spans(xs, x_rows, ys, y_rows, symmetric, columns, first, last, chunk,
                       partial):  # pragma: no cover - compiled
        # partial[s, p, q] (4 x 4) = tile (p, q) of span s's X Y^T, spans first:last; only the
        # tiles p <= q when X Y^T is symmetric (X = Y).
        for s in range(first, last):
            span_start = s * _SPAN
            span_stop = min(columns, span_start + _SPAN)
            for start in range(span_start, span_stop, chunk):
                stop = min(span_stop, start + chunk)
                for p in range(partial.shape[1]):
                    for q in range(p if symmetric else 0, partial.shape[2]):
                        _tile(xs, x_rows, p, ys, y_rows, q, start, stop, partial[s, p, q])

    @numba.njit(nogil=True, fastmath=_FLAGS, cache=True)
    def _combine_range(xs, count, weights, out, first, last, chunk,
                       accumulate):  # pragma: no cover - compiled
        # out[first:last] (+)= sum_{i < count} weights[i] X_i[first:last], summed in float64.
        acc = np.empty(chunk)
        for start in range(first, last, chunk):
            stop = min(last, start + chunk)
            width = stop - start
            row = xs[0][start:stop]
            c = weights[0]
            for k in range(width):
                acc[k] = c * np.float64(row[k])
            for i in range(1, count):
                row = xs[i][start:stop]
                c = weights[i]
                for k in range(width):
                    acc[k] += c * np.float64(row[k])
            target = out[start:stop]
            if accumulate:
                for k in range(width):
                    target[k] = np.float64(target[k]) + acc[k]
            else:
                for k in range(width):
                    target[k] = acc[k]


# ------------------------------------------------------------------------------------ threads
_pool: ThreadPoolExecutor | None = None
_pool_owner: tuple[int, int] | None = None
_pool_lock = threading.Lock()


def _run(work: Callable[[int, int], None], count: int, elements: int) -> None:
    """Call ``work(first, last)`` over a partition of range(count), on several threads if large."""
    threads = min(torch.get_num_threads(), count)
    if threads <= 1 or elements < _PARALLEL_ELEMENTS:
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


def _arrays(rows: list[Tensor]) -> tuple[np.ndarray, ...]:
    """The rows as NumPy views, padded with the last one to a power of two (at least 4).

    One compiled kernel per padded length serves every T up to it; padded rows are read only
    by tiles whose results are dropped.
    """
    arrays = [row.detach().numpy() for row in rows]
    size = max(_TILE, 1 << (len(arrays) - 1).bit_length())
    return tuple(arrays + [arrays[-1]] * (size - len(arrays)))


def _tile_rows(count: int) -> np.ndarray:
    tiles = -(-count // _TILE)
    return np.minimum(np.arange(tiles * _TILE), count - 1).astype(np.int64)


def _chunk(rows: int, itemsize: int) -> int:
    return int(max(256, min(_SPAN, _CHUNK_BYTES // (rows * itemsize) // 64 * 64)))


def _numba_ready(rows: list[Tensor]) -> bool:
    return backend(rows) == "numba" and all(row.stride(0) == 1 or row.numel() <= 1
                                            for row in rows)


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
    listed = _checked_rows(rows)
    if listed[0].numel() == 0:
        return
    if not _numba_ready(listed) or out.device.type != "cpu":
        _torch_products_into(listed, listed, out, symmetric=True)
        return
    out += torch.from_numpy(_products(listed, listed, symmetric=True))


def cross_into(left: Rows, right: Rows, out: Tensor) -> None:
    """out += A B^T for the rows of A (T x n) and of B (U x n), accumulated in float64.

    >>> import torch
    >>> out = torch.zeros(1, 2, dtype=torch.float64)
    >>> cross_into(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), out)
    >>> out
    tensor([[1., 2.]], dtype=torch.float64)
    """
    a, b = _checked_rows(left), _checked_rows(right)
    if a[0].numel() != b[0].numel():
        raise ValueError(f"rows of {a[0].numel()} and {b[0].numel()} elements")
    if a[0].numel() == 0:
        return
    if not (_numba_ready(a) and _numba_ready(b) and a[0].dtype == b[0].dtype
            and out.device.type == "cpu"):
        _torch_products_into(a, b, out, symmetric=False)
        return
    out += torch.from_numpy(_products(a, b, symmetric=False))


def _products(left: list[Tensor], right: list[Tensor], *, symmetric: bool) -> np.ndarray:
    """X Y^T in float64 by the tiled kernel; X = Y when ``symmetric``."""
    columns = left[0].numel()
    xs = _arrays(left)
    ys = xs if symmetric else _arrays(right)
    x_rows, y_rows = _tile_rows(len(left)), _tile_rows(len(right))
    spans = -(-columns // _SPAN)
    partial = np.zeros((spans, len(x_rows) // _TILE, len(y_rows) // _TILE, _TILE, _TILE))
    chunk = _chunk(len(left) + (0 if symmetric else len(right)), left[0].element_size())

    def work(first: int, last: int) -> None:
        _product_spans(xs, x_rows, ys, y_rows, symmetric, columns, first, last, chunk, partial)

    _run(work, spans, (len(left) + len(right)) * columns)
    tiles = partial.sum(axis=0)  # spans in order: independent of the number of threads
    full = tiles.transpose(0, 2, 1, 3).reshape(len(x_rows), len(y_rows))
    full = full[:len(left), :len(right)]
    if symmetric:
        full = np.triu(full) + np.triu(full, 1).T
    return full


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
    listed = _checked_rows(rows)
    columns = listed[0].numel()
    flat_out = out.view(-1)
    if columns == 0:
        return
    c = weights.detach().to(device="cpu", dtype=torch.float64).contiguous()
    if not (_numba_ready(listed) and backend([out]) == "numba" and out.is_contiguous()):
        _torch_combine_into(listed, c, flat_out, accumulate)
        return
    xs = _arrays(listed)
    target = flat_out.numpy()
    weights_np = c.numpy()
    chunk = _chunk(1, 8) // 8  # the float64 accumulator of one chunk stays in L1

    def work(first: int, last: int) -> None:
        # Whole units, so thread boundaries never split a cache line of ``out``.
        _combine_range(xs, len(listed), weights_np, target, first * _COMBINE_UNIT,
                       min(columns, last * _COMBINE_UNIT), chunk, accumulate)

    _run(work, -(-columns // _COMBINE_UNIT), len(listed) * columns)


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
