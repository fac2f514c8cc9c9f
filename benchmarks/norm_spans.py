"""Norm spans: the largest spread of task-gradient norms each min-norm style solver survives.

For every method that promises something about its update (it conflicts with no task, or it
is the exact optimum of the method's problem), N seeded Jacobians per span 10^k (k = 0..14)
whose task-gradient norms span exactly 10^k (largest / smallest): the input classes of
``tests/strategies.SPAN_KINDS`` (random, conflicting, rank-deficient, wide, duplicate,
near-duplicate, exact combinations), 2 to 8 tasks, 1 to 8 dimensions, rescaled by
``spread_norms``. Each promise is checked with the test suite's assertions and rounding-error
tolerances (``tests/properties.py``: bounds derived from the terms that cancel, never a fixed
threshold), so "held" means held to rounding on every case. The table gives the largest span
up to which every case held at every span, and how many of the N failed at the next one.

Guarantees checked:

- no conflict: g_j . D >= -tol_j for every task, tol_j = (6 T + 2 d + 8) eps n_j sum_k |c_k| n_k:
  the rounding of forming D = J^T c and g_j . D, which scales with the task's norm n_j (the
  suite's ``conflict_tolerances`` adds the solver's (sum_k |c_k| n_k)^2 term, which does not,
  and which passes anything for tasks below ~1e-16 of the others: too weak to measure spans);
- min-norm KKT: (M w)_j >= w^T M w - tol_j (the min-norm point, docs/methods.md#min-norm);
- dual KKT: the CAGrad dual's optimality conditions on the original M (``test_solvers.
  assert_conflict_averse_optimal``, docs/methods.md#conflict-averse);
- projection KKT: each row of ``dual_cone_weights`` certifies the projection onto the dual
  cone (``properties.assert_dual_cone_projection``, docs/methods.md#dual-cone).

    .venv/bin/python benchmarks/norm_spans.py              # about 1 minute on 2 busy cores
    .venv/bin/python benchmarks/norm_spans.py --cases 20   # quicker
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _harness import save, table

# The guarantees are checked with the suite's own assertions and tolerances: one definition.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from properties import (
    as_array,
    assert_conflict_averse_optimal,
    assert_dual_cone_projection,
    assert_no_conflict,
    conflict_tolerances,
    gamma,
    nnls_kkt_rtol,
)
from strategies import SPAN_KINDS, build_jacobian, spread_norms

import deconflict
from deconflict.solvers import (
    conflict_averse_solution,
    dual_cone_weights,
    min_norm_solution,
)

Check = Callable[[np.ndarray, np.ndarray], None]  # (J, losses) -> raises AssertionError


def per_task_tolerances(J: np.ndarray, c: np.ndarray) -> np.ndarray:
    """(6 T + 2 d + 8) eps n_j sum_k |c_k| n_k: see the module docstring."""
    T, d = J.shape
    n = np.linalg.norm(J, axis=1)
    return 2.0 * gamma(6 * T + 2 * d + 8) * n * float(np.abs(c) @ n)


def no_conflict(factory: Callable[[], Any], calls: int = 1) -> Check:
    """D = J^T c conflicts with no task, on each of ``calls`` consecutive steps of one method
    instance (the tensioner tensions from its third step, Nash-MTL warm-starts)."""
    def check(J: np.ndarray, losses: np.ndarray) -> None:
        method = factory()
        for step in range(calls):
            c, _ = method.weights_with_diagnostics(torch.from_numpy(J @ J.T),
                                                   losses=losses * (1.0 + 0.1 * step))
            c = as_array(c)
            assert_no_conflict(J, c @ J, per_task_tolerances(J, c))
    return check


def min_norm_kkt(J: np.ndarray, losses: np.ndarray) -> None:
    M = J @ J.T
    w, verified = min_norm_solution(M)
    assert verified
    Mw = M @ w
    assert np.all(Mw >= w @ Mw - conflict_tolerances(J, w))


def cagrad(c: float) -> Check:
    """The dual's KKT conditions; for c >= 1 also the method's update conflicts with no task."""
    def check(J: np.ndarray, losses: np.ndarray) -> None:
        anchor = np.full(J.shape[0], 1.0 / J.shape[0])
        solution = conflict_averse_solution(J @ J.T, anchor, c)
        assert solution.verified
        assert_conflict_averse_optimal(J, anchor, c, solution)
        if c >= 1.0:
            no_conflict(lambda: deconflict.CAGrad(c=c, rescale=0))(J, losses)
    return check


def projection_kkt(J: np.ndarray, losses: np.ndarray) -> None:
    """UPGrad's projections of every e_i (and DualProj's of the mean) onto the dual cone."""
    M = J @ J.T
    T = M.shape[0]
    targets = np.vstack([np.eye(T), np.full((1, T), 1.0 / T)])
    for u, v in zip(targets, dual_cone_weights(M, targets), strict=True):
        assert_dual_cone_projection(M, u, v, nnls_kkt_rtol(T))


# (method, guarantee, check)
CHECKS: list[tuple[str, str, Check]] = [
    *[(f"MGDA normalizer={name}", "no conflict",
       no_conflict(lambda name=name: deconflict.MGDA(normalizer=name)))
      for name in ("none", "l2", "loss", "loss+")],
    ("MGDA min-norm point (Wolfe)", "min-norm KKT", min_norm_kkt),
    ("MGDA-UB", "no conflict", no_conflict(lambda: deconflict.MGDAUB())),
    ("tensioner base=central", "no conflict",
     no_conflict(lambda: deconflict.get("tensioner", window=1), calls=3)),
    ("tensioner base=min_norm", "no conflict",
     no_conflict(lambda: deconflict.get("tensioner", window=1, base="min_norm"), calls=3)),
    *[(f"CAGrad c={c:g}", "dual KKT" + ("; no conflict" if c >= 1 else ""), cagrad(c))
      for c in (0.2, 0.5, 1.0, 2.0)],
    ("Nash-MTL", "no conflict",
     no_conflict(lambda: deconflict.NashMTL(max_norm=0.0), calls=3)),
    ("dual_cone_weights (UPGrad, DualProj)", "projection KKT", projection_kkt),
    ("UPGrad", "no conflict", no_conflict(lambda: deconflict.get("upgrad"))),
    ("DualProj", "no conflict", no_conflict(lambda: deconflict.get("dualproj"))),
    ("IMTL-G", "no conflict", no_conflict(lambda: deconflict.get("imtl_g"))),
    ("GradOPS alpha=0", "no conflict", no_conflict(lambda: deconflict.get("gradops"))),
    ("GradOPS-static", "no conflict", no_conflict(lambda: deconflict.get("gradops_static"))),
    ("FairGrad", "no conflict", no_conflict(lambda: deconflict.get("fairgrad"))),
]


def jacobians(span: float, cases: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``cases`` (J, losses) with norms spanning ``span``; the same draws for every method."""
    rng = np.random.default_rng([seed, round(np.log10(span))])
    out = []
    for _ in range(cases):
        kind = SPAN_KINDS[int(rng.integers(len(SPAN_KINDS)))]
        tasks, dim = int(rng.integers(2, 9)), int(rng.integers(1, 9))
        draw = int(rng.integers(2**31))
        J = spread_norms(build_jacobian(kind, draw, tasks, dim, 0.0), draw + 1, span)
        out.append((J, np.exp(rng.uniform(-1.0, 1.0, size=J.shape[0]))))
    return out


def failures(check: Check, cases: list[tuple[np.ndarray, np.ndarray]]) -> int:
    count = 0
    for J, losses in cases:
        try:
            check(J, losses)
        except AssertionError:
            count += 1
    return count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=200, help="Jacobians per span (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-exponent", type=int, default=14,
                   help="largest span 10^k tried (default 14; float64 squares norms to 1e308)")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default results/benchmarks/)")
    args = p.parse_args()
    args.repeats, args.warmup = 1, 0  # recorded by save(); nothing here is timed in rounds
    torch.manual_seed(args.seed)
    # Zero updates (IMTL-G with more tasks than the rank of J) are announced once per method
    # instance; a fresh instance per case would print one per case. They never conflict.
    warnings.filterwarnings("ignore", category=deconflict.ZeroUpdateWarning)
    start = time.perf_counter()
    spans = [10.0**k for k in range(args.max_exponent + 1)]
    draws = {span: jacobians(span, args.cases, args.seed) for span in spans}
    rows: list[dict[str, Any]] = []
    for label, guarantee, check in CHECKS:
        failed = {span: failures(check, draws[span]) for span in spans}
        held = None
        for span in spans:
            if failed[span]:
                break
            held = span
        nxt = None if held == spans[-1] else spans[0 if held is None else spans.index(held) + 1]
        rows.append({
            "method": label, "guarantee": guarantee,
            "held": "none" if held is None else f"1e{round(np.log10(held))}"
                    + (" (all)" if held == spans[-1] else ""),
            "next": None if nxt is None else f"{failed[nxt]} / {args.cases} at "
                    f"1e{round(np.log10(nxt))}",
            "failures": {f"1e{round(np.log10(s))}": failed[s] for s in spans},
        })
        print(f"{label}: held to {rows[-1]['held']}", flush=True)
    print(table(rows, [("method", "method"), ("guarantee", "guarantee checked"),
                       ("held", f"largest span held (up to 1e{args.max_exponent})"),
                       ("next", "failures at the next span")]))
    print(f"{args.cases} Jacobians per span, seed {args.seed}, "
          f"{time.perf_counter() - start:.0f} s")
    print(f"written: {save('norm_spans', args, rows)}")


if __name__ == "__main__":
    main()
