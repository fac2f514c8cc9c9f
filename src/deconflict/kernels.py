"""The two passes over the Jacobian, as fused float64 kernels: M += J J^T and out (+)= J^T c.

A T x n block of float32 (or float64) gradients is read once per pass and converted to float64
in registers, so both results carry float64 accuracy (METHODS.md Section 0, "Precision") at about
the cost of reading J: no float64 copy of J, no d-sized temporary. ``out`` may be a parameter's
``.grad`` itself.

Two implementations:

- "numba" (CPU tensors of float32/float64 with unit column stride): compiled loops. The Gramian
  is computed in 4 x 4 tiles of task pairs over column chunks that stay in the L1/L2 cache: per
  column, 8 loads feed 16 fused multiply-adds, so a tile runs at the speed of the arithmetic
  while the chunk is read from memory only once. Columns are split into fixed spans whose
  partial Gramians are summed in span order, so the result does not depend on the number of
  threads. Threads come from a small pool (the kernels release the GIL), sized by
  ``torch.get_num_threads()``.
- "torch" (any other device or dtype, or when numba is unavailable): float64 copies of column
  chunks, multiplied with ``torch.mm``. Correct everywhere; slower on the CPU because BLAS is
  poorly suited to T x T products with a long inner dimension.

``DECONFLICT_KERNELS=torch`` forces the second, e.g. to compare them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the library usable
    numba = None

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


def backend(tensor: Tensor) -> str:
    """The implementation used for ``tensor``: "numba" or "torch"."""
    if (
        numba is None
        or os.environ.get("DECONFLICT_KERNELS", "").lower() == "torch"
        or tensor.device.type != "cpu"
        or tensor.dtype not in (torch.float32, torch.float64)
        or tensor.is_conj()
        or tensor.is_neg()
    ):
        return "torch"
    return "numba"


# ------------------------------------------------------------------------------- numba kernels
if numba is not None:

    @numba.njit(nogil=True, fastmath=_FLAGS, cache=True, inline="always")
    def _tile(xs, x_rows, p, ys, y_rows, q, start, stop, out):  # pragma: no cover - compiled
        # out[a, b] += sum_k X[x_rows[4p + a], k] Y[y_rows[4q + b], k], columns start:stop.
        o = 4 * p
        x0 = xs[x_rows[o] + start:x_rows[o] + stop]
        x1 = xs[x_rows[o + 1] + start:x_rows[o + 1] + stop]
        x2 = xs[x_rows[o + 2] + start:x_rows[o + 2] + stop]
        x3 = xs[x_rows[o + 3] + start:x_rows[o + 3] + stop]
        o = 4 * q
        y0 = ys[y_rows[o] + start:y_rows[o] + stop]
        y1 = ys[y_rows[o + 1] + start:y_rows[o + 1] + stop]
        y2 = ys[y_rows[o + 2] + start:y_rows[o + 2] + stop]
        y3 = ys[y_rows[o + 3] + start:y_rows[o + 3] + stop]
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
    def _combine_range(flat, rows, weights, out, first, last, chunk,
                       accumulate):  # pragma: no cover - compiled
        # out[first:last] (+)= sum_i weights[i] J[i, first:last], summed in float64.
        acc = np.empty(chunk)
        for start in range(first, last, chunk):
            stop = min(last, start + chunk)
            width = stop - start
            row = flat[rows[0] + start:rows[0] + stop]
            c = weights[0]
            for k in range(width):
                acc[k] = c * np.float64(row[k])
            for i in range(1, weights.shape[0]):
                row = flat[rows[i] + start:rows[i] + stop]
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


def _flat_rows(block: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """A 1-D NumPy view covering the block's rows, and each row's start in it."""
    rows, columns = block.shape
    row_stride = block.stride(0) if rows > 1 else columns
    span = (rows - 1) * row_stride + columns
    flat = torch.as_strided(block.detach(), (span,), (1,)).numpy()
    return flat, np.arange(rows, dtype=np.int64) * row_stride


def _chunk(rows: int, itemsize: int) -> int:
    return int(max(256, min(_SPAN, _CHUNK_BYTES // (rows * itemsize) // 64 * 64)))


def _numba_ready(block: Tensor) -> bool:
    return backend(block) == "numba" and block.shape[1] > 0 and (
        block.shape[1] == 1 or block.stride(1) == 1)


# ------------------------------------------------------------------------------------ Gramian
def gramian_into(block: Tensor, out: Tensor) -> None:
    """out += J J^T for a T x n block J, accumulated in float64 (``out``: T x T float64)."""
    if block.shape[0] == 0 or block.shape[1] == 0:
        return
    if not _numba_ready(block) or backend(out) != "numba":
        _torch_gramian_into(block, out)
        return
    out += torch.from_numpy(_products(block, block, symmetric=True)).to(out.device)


def cross_into(left: Tensor, right: Tensor, out: Tensor) -> None:
    """out += A B^T for blocks A (T x n) and B (U x n), accumulated in float64."""
    if left.shape[1] != right.shape[1]:
        raise ValueError(f"blocks of {left.shape[1]} and {right.shape[1]} columns")
    if left.shape[0] == 0 or right.shape[0] == 0 or left.shape[1] == 0:
        return
    if not (_numba_ready(left) and _numba_ready(right) and left.dtype == right.dtype
            and backend(out) == "numba"):
        step = max(256, (1 << 19) // max(left.shape[0], right.shape[0]))
        for start in range(0, left.shape[1], step):
            out.addmm_(left[:, start:start + step].to(torch.float64),
                       right[:, start:start + step].to(torch.float64).T)
        return
    out += torch.from_numpy(_products(left, right, symmetric=False)).to(out.device)


def _products(left: Tensor, right: Tensor, *, symmetric: bool) -> np.ndarray:
    """X Y^T in float64 by the tiled kernel; X = Y when ``symmetric``."""
    rows, columns = left.shape[0], left.shape[1]
    xs, x_rows = _flat_rows(left)
    ys, y_rows = (xs, x_rows) if symmetric else _flat_rows(right)
    x_tiles, y_tiles = -(-rows // _TILE), -(-right.shape[0] // _TILE)
    # Rows beyond the last repeat it; their products are computed and dropped.
    x_rows = _pad_rows(x_rows, x_tiles)
    y_rows = _pad_rows(y_rows, y_tiles)
    spans = -(-columns // _SPAN)
    partial = np.zeros((spans, x_tiles, y_tiles, _TILE, _TILE))
    chunk = _chunk(rows + (0 if symmetric else right.shape[0]), left.element_size())

    def work(first: int, last: int) -> None:
        _product_spans(xs, x_rows, ys, y_rows, symmetric, columns, first, last, chunk, partial)

    _run(work, spans, (rows + right.shape[0]) * columns)
    tiles = partial.sum(axis=0)  # spans in order: independent of the number of threads
    full = tiles.transpose(0, 2, 1, 3).reshape(x_tiles * _TILE, y_tiles * _TILE)
    full = full[:rows, :right.shape[0]]
    if symmetric:
        full = np.triu(full) + np.triu(full, 1).T
    return full


def _pad_rows(starts: np.ndarray, tiles: int) -> np.ndarray:
    return np.concatenate([starts, np.full(tiles * _TILE - len(starts), starts[-1],
                                           dtype=np.int64)])


def _torch_gramian_into(block: Tensor, out: Tensor) -> None:
    part = torch.zeros_like(out)
    if block.dtype == torch.float64:
        part.addmm_(block, block.T)
    else:
        step = max(256, (1 << 19) // block.shape[0])
        for start in range(0, block.shape[1], step):
            chunk = block[:, start:start + step].to(torch.float64)
            part.addmm_(chunk, chunk.T)
    out += (part + part.T) / 2  # exactly symmetric, like the compiled kernel's


# -------------------------------------------------------------------------------- combination
def combine_into(block: Tensor, weights: Tensor, out: Tensor, *, accumulate: bool) -> None:
    """out (+)= J^T c for a T x n block J, summed in float64 and rounded once into ``out``.

    ``out`` holds n elements (any shape, contiguous: e.g. a parameter's ``.grad``);
    ``accumulate`` adds to it, otherwise it is overwritten.
    """
    rows, columns = block.shape
    flat_out = out.view(-1)
    if columns == 0:
        return
    c = weights.detach().to(device="cpu", dtype=torch.float64).contiguous()
    if not (_numba_ready(block) and backend(out) == "numba" and out.is_contiguous()):
        _torch_combine_into(block, c, flat_out, accumulate)
        return
    flat, starts = _flat_rows(block)
    target = flat_out.numpy()
    weights_np = c.numpy()
    chunk = _chunk(1, 8) // 8  # the float64 accumulator of one chunk stays in L1

    def work(first: int, last: int) -> None:
        # Units of 4096 columns, so thread boundaries never split a cache line of ``out``.
        _combine_range(flat, starts, weights_np, target, first * 4096,
                       min(columns, last * 4096), chunk, accumulate)

    _run(work, -(-columns // 4096), rows * columns)


def _torch_combine_into(block: Tensor, c: Tensor, flat_out: Tensor, accumulate: bool) -> None:
    c = c.to(block.device)
    step = max(256, (1 << 19) // block.shape[0])
    for start in range(0, block.shape[1], step):
        part = c @ block[:, start:start + step].to(torch.float64)
        target = flat_out[start:start + step]
        if accumulate:
            part += target.to(torch.float64)
        target.copy_(part)
