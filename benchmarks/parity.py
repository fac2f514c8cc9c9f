"""Parity of the newer methods with TorchJD 0.18: the largest relative difference measured.

The tests (tests/test_new_methods.py, tests/test_new_methods_2.py) assert bounds on the same
comparisons; this script prints the largest difference seen, the figures quoted in
docs/methods.md#parity. Run from the repository root:

    .venv/bin/python benchmarks/parity.py
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torchjd.aggregation as tja
import torchjd.scalarization as tjs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_new_methods_2 import _gramian_sequence

import deconflict
from deconflict.methods.cosmos import COSMOS
from deconflict.methods.excess_mtl import ExcessMTL
from deconflict.methods.fairgrad import relative_residual
from deconflict.methods.krum import krum_scores
from deconflict.methods.modo import MoDo
from deconflict.methods.pcd import PCD
from deconflict.methods.sdmgrad import SDMGrad


def relative(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def jacobians(count: int = 60, seed: int = 0) -> Iterator[torch.Tensor]:
    """Random T x d Jacobians, T from 2 to 5, d from T to 11."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        T = int(rng.integers(2, 6))
        yield torch.from_numpy(rng.standard_normal((T, int(rng.integers(T, 12)))))


def update(J: torch.Tensor, method: deconflict.Method) -> np.ndarray:
    return deconflict.aggregate(J, method).numpy()


def fairgrad() -> None:
    for alpha in (0.5, 1.0, 2.0):
        diff, ours, theirs = 0.0, 0.0, 0.0
        for J in jacobians():
            M = (J @ J.T).numpy()
            t = tja.FairGradWeighting(alpha)(torch.from_numpy(M)).numpy()
            m = deconflict.FairGrad(alpha).weights(M).numpy()
            diff = max(diff, relative(m @ J.numpy(), t @ J.numpy()))
            ours = max(ours, float(relative_residual(M, m, alpha).max()))
            theirs = max(theirs, float(relative_residual(M, t, alpha).max()))
        print(f"fairgrad alpha={alpha}: {diff:.1e} (residual of (M w)_i = w_i^(-1/alpha): "
              f"ours {ours:.1e}, TorchJD {theirs:.1e})")


def config() -> None:
    rng = np.random.default_rng(1)
    plain, preferred = 0.0, 0.0
    for J in jacobians():
        plain = max(plain, relative(update(J, deconflict.ConFIG()), tja.ConFIG()(J).numpy()))
        p = rng.uniform(0.1, 2, J.shape[0])
        ours = update(J, deconflict.ConFIG(pref_vector=p.tolist()))
        preferred = max(preferred, relative(ours, tja.ConFIG(pref_vector=torch.from_numpy(p))(J)
                                            .numpy()))
    print(f"config: {plain:.1e} (p = 1), {preferred:.1e} (random p)")


def krum() -> None:
    rng = np.random.default_rng(2)
    diff, cases, tied = 0.0, 0, 0
    for J in jacobians(80):
        T = J.shape[0]
        M = (J @ J.T).numpy()
        for f in range(T - 2):
            m = int(rng.integers(1, T + 1))
            scores = np.sort(krum_scores(M, f, squared=False))
            if m < T and scores[m] - scores[m - 1] <= 1e-12 * scores[m]:
                tied += 1  # TorchJD breaks ties its own way
                continue
            ours = update(J, deconflict.Krum(n_byzantine=f, n_selected=m, distance="euclidean"))
            diff = max(diff, relative(ours, tja.Krum(n_byzantine=f, n_selected=m)(J).numpy()))
            cases += 1
    print(f"krum (distance=euclidean): {diff:.1e} over {cases} cases ({tied} ties skipped)")


def trimmed_mean() -> None:
    diff = max(relative(update(J, deconflict.TrimmedMean(trim=k)),
                        tja.TrimmedMean(trim_number=k)(J).numpy())
               for J in jacobians(80) for k in range((J.shape[0] - 1) // 2 + 1))
    print(f"trimmed_mean: {diff:.1e}")


def cr_mogm() -> None:
    base = deconflict.get("upgrad")
    theirs = tja.CRMOGMWeighting(lambda M: base.weights(M), alpha=0.9)
    ours = deconflict.CRMOGM("upgrad", 0.9)
    diff = 0.0
    for J in jacobians(30):
        if J.shape[0] == 3:  # one sequence of steps needs one task count
            M = (J @ J.T).numpy()
            diff = max(diff, relative(ours.weights(M).numpy(), theirs(torch.from_numpy(M))
                                      .numpy()))
    print(f"cr_mogm (TorchJD's CRMOGMWeighting around the same UPGrad weights): {diff:.1e}")


def scalarizations() -> None:
    rng = np.random.default_rng(3)
    diff = 0.0
    for _ in range(200):
        L = torch.tensor(rng.uniform(0.01, 10, int(rng.integers(1, 7))), dtype=torch.float64,
                         requires_grad=True)
        (grad,) = torch.autograd.grad(tjs.GeometricMean()(L), L)
        weights = deconflict.GeometricMean().weights(losses=L.detach().numpy()).numpy()
        diff = max(diff, relative(weights, grad.numpy()))
    print(f"geometric_mean (weights vs autograd of TorchJD's GeometricMean): {diff:.1e}")
    rng = np.random.default_rng(0)
    diff = 0.0
    for _ in range(200):
        T = int(rng.integers(1, 6))
        r = torch.from_numpy(rng.uniform(0.05, 2, T))
        lam = float(rng.uniform(0, 8))
        L = torch.tensor(rng.uniform(0.01, 5, T), dtype=torch.float64, requires_grad=True)
        tjs.COSMOS(lambda_=lam, weights=r)(L).backward()
        c = COSMOS(lam=lam, pref_vector=r.tolist()).weights(losses=L.detach().numpy()).numpy()
        diff = max(diff, relative(c, L.grad.numpy()))
    print(f"cosmos (weights vs autograd of TorchJD's COSMOS): {diff:.1e}")


def stateful() -> None:
    for gamma, rho in ((0.1, 0.1), (0.02, 0.0)):
        theirs, ours = tja.MoDoWeighting(gamma=gamma, rho=rho), MoDo(gamma=gamma, rho=rho)
        diff = max(relative(ours.weights(M).numpy(), theirs(torch.from_numpy(M)).numpy())
                   for M in _gramian_sequence(30))
        print(f"modo gamma={gamma} rho={rho} (30 steps): {diff:.1e}")
    for scale in (1e8, 1.0):
        theirs, ours = tja.SDMGradWeighting(), SDMGrad()
        diff = max(relative(ours.weights(M).numpy(), theirs(torch.from_numpy(M)).numpy())
                   for M in _gramian_sequence(15, scale=scale))
        print(f"sdmgrad, Gramian scale {scale:g} (15 steps): {diff:.1e}")
    for warmup in (0, 3):
        rng = np.random.default_rng(12)
        theirs, ours = tja.ExcessMTL(n_warmup_steps=warmup), ExcessMTL(n_warmup_steps=warmup)
        diff = 0.0
        for _ in range(20):
            J = torch.from_numpy(rng.standard_normal((3, 8)))
            diff = max(diff, relative(update(J, ours), theirs(J).numpy()))
        print(f"excess_mtl n_warmup_steps={warmup} (20 steps): {diff:.1e}")


def pcd() -> None:
    for tau in (0.0, 0.02, 0.3, 0.9):
        rng = np.random.default_rng(int(tau * 100))
        diff = 0.0
        for _ in range(25):
            T = int(rng.integers(2, 6))
            n = int(rng.integers(T + 1, T + 5))
            ours, theirs = PCD(tau=tau, beta=0.9), tja.PCD(tau=tau, beta=0.9)
            scale = np.exp(rng.normal(size=(T, 1)))
            for _ in range(8):  # the moving average of the norms carries over the steps
                J = rng.normal(size=(T, n)) * scale
                c = ours.weights(J @ J.T).numpy()
                diff = max(diff, relative(J.T @ c, theirs(torch.from_numpy(J)).numpy()))
        print(f"pcd tau={tau} (25 sequences of 8 steps): {diff:.1e}")


def main() -> None:
    warnings.simplefilter("ignore")
    print("largest relative difference from TorchJD 0.18 (update or weights)")
    for part in (fairgrad, config, krum, trimmed_mean, cr_mogm, scalarizations, stateful, pcd):
        part()


if __name__ == "__main__":
    main()
