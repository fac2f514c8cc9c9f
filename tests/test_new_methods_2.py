"""The methods of issue 16's second batch: the log-loss variants (log_losses, mgda_log,
cagrad_log, imtl_g_log, si_ls), COSMOS, Aligned-MTL-UB, MoCo, MoDo, SDMGrad and ExcessMTL.

Golden values are derived by hand in each test's docstring; the properties are the ones each
definition promises (docs/methods.md#<name>); parity is with TorchJD 0.18 where it has the
method (COSMOS, MoDo, SDMGrad, ExcessMTL) and with the authors' / LibMTL's recursion written out
here otherwise (MoCo). Where both sides compute the same floating-point operations on the same
inputs (powers of two scale exactly), the comparison is bitwise.
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from properties import (
    GOLDEN_RTOL,
    assert_close_relative,
    assert_non_conflicting,
    gamma,
    manual_jacobian,
    update,
)
from strategies import jacobians
from torch import nn

import deconflict
import deconflict.methods.aligned_mtl_ub
import deconflict.methods.cosmos
import deconflict.methods.excess_mtl
import deconflict.methods.log_losses
import deconflict.methods.moco
import deconflict.methods.modo
import deconflict.methods.sdmgrad
import deconflict.methods.si_ls
from deconflict.methods import GramianWeighting, JacobianAggregator, LossWeighting
from deconflict.methods._simplex import project_onto_simplex
from deconflict.methods.aligned_mtl_ub import AlignedMTLUB
from deconflict.methods.cosmos import COSMOS
from deconflict.methods.excess_mtl import ExcessMTL
from deconflict.methods.log_losses import BASES, CAGradLog, IMTLGLog, LogLosses, MGDALog
from deconflict.methods.moco import MoCo
from deconflict.methods.modo import MoDo
from deconflict.methods.registry import method_class
from deconflict.methods.sdmgrad import SDMGrad
from deconflict.methods.si_ls import SILS

_EPS = float(np.finfo(np.float64).eps)
NEW = ("log_losses", "mgda_log", "cagrad_log", "imtl_g_log", "si_ls", "cosmos",
       "aligned_mtl_ub", "moco", "modo", "sdmgrad", "excess_mtl")


def quiet(method, J, **context) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", deconflict.ZeroUpdateWarning)
        return update(method, J, **context)


def _problems(count: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        T = int(rng.integers(2, 6))
        yield rng.standard_normal((T, int(rng.integers(T, 12))))


def _relative(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _powers_of_two(rng: np.random.Generator, T: int) -> np.ndarray:
    return 2.0 ** rng.integers(-6, 7, T).astype(np.float64)


# ------------------------------------------------------------------------ the registry
def test_the_new_methods_are_registered_with_their_protocol():
    kinds = {"log_losses": GramianWeighting, "mgda_log": GramianWeighting,
             "cagrad_log": GramianWeighting, "imtl_g_log": GramianWeighting,
             "aligned_mtl_ub": GramianWeighting, "modo": GramianWeighting,
             "sdmgrad": GramianWeighting, "si_ls": LossWeighting, "cosmos": LossWeighting,
             "moco": JacobianAggregator, "excess_mtl": JacobianAggregator}
    for name, kind in kinds.items():
        assert isinstance(deconflict.get(name), kind), name
    stateful = {name for name in NEW if method_class(name).stateful}
    assert stateful == {"log_losses", "moco", "modo", "sdmgrad", "excess_mtl"}
    assert AlignedMTLUB.needs_features and not deconflict.AlignedMTL.needs_features


def test_log_losses_bases_are_every_gramian_method_but_the_excluded():
    gramian = {name for name in deconflict.available()
               if issubclass(method_class(name), GramianWeighting)}
    excluded = {"log_losses", "mgda_log", "cagrad_log", "imtl_g_log", "mgda_ub",
                "aligned_mtl_ub", "cagrad_fast"}
    assert set(BASES) == gramian - excluded
    with pytest.raises(deconflict.InvalidOptionError, match="base must be one of"):
        LogLosses(base="mgda_ub")


# ------------------------------------------------------------------- log-loss variants
def test_mgda_log_golden():
    """g_1 = (1, 0), g_2 = (-1/2, 1), L = (1, 2): the log-loss gradients are a = (1, 0) and
    b = (-1/4, 1/2); the min-norm point of [a, b] is b + t (a - b) with
    t = -b.(a - b) / |a - b|^2 = (9/16) / (29/16) = 9/29, i.e. (4/29, 10/29), with weights
    (9/29, 20/29) on (a, b), hence c = (9/29, 10/29) on (g_1, g_2)."""
    J = np.array([[1.0, 0.0], [-0.5, 1.0]])
    c, diagnostics = MGDALog().weights_with_diagnostics(J @ J.T, losses=[1.0, 2.0])
    assert_close_relative(c.numpy(), [9 / 29, 10 / 29], GOLDEN_RTOL)
    assert_close_relative(diagnostics["log_weights"].numpy(), [9 / 29, 20 / 29], GOLDEN_RTOL)
    assert_close_relative(update(MGDALog(), J, losses=[1.0, 2.0]), [4 / 29, 10 / 29],
                          GOLDEN_RTOL)


def test_cagrad_log_and_imtl_g_log_golden():
    """Orthogonal g = e_1, e_2 with L = (1, 2): log-loss gradients (1, 0), (0, 1/2). CAGrad
    with c = 0 is their mean (1/2, 1/4). IMTL-G: D = (a, b/2) with equal projections a = b/2
    on the unit gradients and a + b = 1: (1/3, 1/3). SI-LS: c = 1/L = (1, 1/2)."""
    J, losses = np.eye(2), [1.0, 2.0]
    assert_close_relative(update(CAGradLog(c=0.0), J, losses=losses), [0.5, 0.25], GOLDEN_RTOL)
    assert_close_relative(update(IMTLGLog(), J, losses=losses), [1 / 3, 1 / 3], GOLDEN_RTOL)
    assert_close_relative(SILS().weights(losses=losses).numpy(), [1.0, 0.5], GOLDEN_RTOL)


@pytest.mark.parametrize("base", BASES)
def test_log_losses_is_the_base_on_the_log_scaled_jacobian_bitwise(base):
    """log_losses(base) on (J, L) against base on J_log = S J, S = diag(1 / L): with powers of
    two as losses S J, the Gramians (S M S against (S J)(S J)^T) and the update are scaled
    exactly, so both evaluate the same roundings: equal to the last bit, over 8 steps (a
    stateful base carries its state; the base sees the log losses in both)."""
    rng = np.random.default_rng(BASES.index(base))
    wrapped, reference = LogLosses(base=base), method_class(base)()
    for _ in range(8):
        J = rng.standard_normal((4, 6))
        losses = _powers_of_two(rng, 4)
        torch.manual_seed(0)  # PCGrad draws its task order from the global generator
        mine = quiet(wrapped, J, losses=losses)
        torch.manual_seed(0)
        theirs = quiet(reference, J / losses[:, None], losses=np.log(losses))
        np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("make", [MGDALog, CAGradLog, IMTLGLog], ids=lambda m: m.name)
def test_the_named_variants_are_log_losses_of_their_base(make):
    name = make.name.removesuffix("_log")
    for J in _problems(20, seed=5):
        losses = np.linspace(0.3, 3.0, J.shape[0])
        np.testing.assert_array_equal(quiet(make(), J, losses=losses),
                                      quiet(LogLosses(base=name), J, losses=losses))


@pytest.mark.parametrize("name", ["log_losses", "mgda_log", "cagrad_log", "imtl_g_log", "si_ls"])
@settings(max_examples=40)
@given(J=jacobians(kinds=("random", "norm_spread", "conflicting", "rank_deficient"),
                   scales=False), seed=st.integers(0, 2**16))
def test_rescaling_a_loss_and_its_gradient_changes_nothing(name, J, seed):
    """The point of the log: (s_i L_i, s_i g_i) gives the update of (L_i, g_i). With powers of
    two s_i every quantity is scaled exactly (the base gets log(s_i L_i): the defaults of these
    bases do not read the loss values), so the updates are equal bitwise; for any other s_i
    they are equal up to the rounding of S M S, checked on IMTL-G's closed form."""
    rng = np.random.default_rng(seed)
    T = J.shape[0]
    losses = rng.uniform(0.2, 5.0, T)
    s = _powers_of_two(rng, T)
    base = quiet(deconflict.get(name), J, losses=losses)
    scaled = quiet(deconflict.get(name), J * s[:, None], losses=losses * s)
    np.testing.assert_array_equal(scaled, base)


def test_arbitrary_loss_scales_agree_to_rounding():
    """Non-power-of-two scales: S M S picks up one rounding per entry and the cosine matrix K
    IMTL-G solves with 3 more, so K moves by at most 4 T eps in norm; two backward-stable
    solves of K x = 1 then differ by 2 cond(K) (T gamma_(T+1) + 4 T eps) relative
    (solve_rtol's argument), and forming D = J^T c adds 2 gamma_T, each relative to
    sigma = sum_i |c_i| ||g_i|| (the terms that cancel in D)."""
    rng = np.random.default_rng(8)
    for J in _problems(30, seed=9):
        T = J.shape[0]
        losses, s = rng.uniform(0.2, 5.0, T), rng.uniform(0.1, 10.0, T)
        base = update(IMTLGLog(), J, losses=losses)
        scaled = update(IMTLGLog(), J * s[:, None], losses=losses * s)
        units = J / np.linalg.norm(J, axis=1, keepdims=True)
        condition = np.linalg.cond(units @ units.T)
        c = IMTLGLog().weights(J @ J.T, losses=losses).numpy()
        sigma = float(np.abs(c) @ np.linalg.norm(J, axis=1)) / float(np.linalg.norm(base))
        rtol = (2 * condition * (T * gamma(T + 1) + 4 * T * _EPS) + 2 * gamma(T)) * sigma
        assert_close_relative(scaled, base, rtol)


def test_imtl_g_log_is_imtl_g_rescaled():
    """The unit gradients do not change under 1 / L_i, so IMTL-G's direction does not either:
    with IMTL-G's alpha (1^T alpha = 1), alpha' = t L alpha on the log-loss gradients and
    1^T alpha' = 1 give the update IMTL-G's / (sum_i alpha_i L_i). Two closed-form solves on
    the same cosine matrix: cond(K) times their backward errors (solve_rtol's argument)."""
    rng = np.random.default_rng(10)
    for J in _problems(30, seed=11):
        T = J.shape[0]
        losses = rng.uniform(0.2, 5.0, T)
        alpha = deconflict.IMTLG(sign_guard="off").weights(J @ J.T).numpy()
        if alpha @ losses <= 0:  # the sign guards would act differently: not this relation
            continue
        expected = (alpha @ J) / (alpha @ losses)
        got = update(IMTLGLog(sign_guard="off"), J, losses=losses)
        units = J / np.linalg.norm(J, axis=1, keepdims=True)
        sigma = float(np.abs(alpha) @ np.linalg.norm(J, axis=1)) / float(
            np.linalg.norm(alpha @ J))
        rtol = (2 * np.linalg.cond(units @ units.T) * (T * gamma(T + 1) + 4 * T * _EPS)
                + 4 * gamma(T)) * sigma
        assert_close_relative(got, expected, rtol)


def test_log_variants_refuse_non_positive_or_missing_losses():
    M = np.eye(2)
    for method in (MGDALog(), LogLosses(), SILS()):
        with pytest.raises(deconflict.InvalidOptionError,
                           match=rf"{method.name} works on log L_i, which needs positive "
                                 r"losses, got L_1 = 0\.0"):
            method.weights(M, losses=[1.0, 0.0])
        with pytest.raises(deconflict.InvalidOptionError, match="needs the losses"):
            method.weights(M)
    with pytest.raises(deconflict.InvalidOptionError, match=r"got L_0 = -2\.0"):
        update(CAGradLog(), np.eye(2), losses=[-2.0, 1.0])


def test_log_losses_keeps_a_stateful_base_state_exactly():
    """log_losses(nash_mtl): its state is Nash-MTL's warm start, saved under base_state; a run
    resumed from torch.save / torch.load(weights_only=True) continues bitwise, reset() starts
    over, and the steps equal Nash-MTL's on the log-scaled Jacobians (powers of two)."""
    rng = np.random.default_rng(1)
    steps = [(rng.standard_normal((3, 6)), _powers_of_two(rng, 3)) for _ in range(12)]
    nash = deconflict.NashMTL()
    expected = [quiet(nash, J / L[:, None]) for J, L in steps]
    first = LogLosses(base="nash_mtl")
    got = [quiet(first, J, losses=L) for J, L in steps[:5]]
    assert sorted(first.state_dict()) == ["base_state"]
    assert sorted(first.state_dict()["base_state"]) == ["alpha", "step"]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = LogLosses(base="nash_mtl")
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got += [quiet(resumed, J, losses=L) for J, L in steps[5:]]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    resumed.reset()
    J, L = steps[0]
    np.testing.assert_array_equal(quiet(resumed, J, losses=L), expected[0])
    with pytest.raises(deconflict.InvalidOptionError, match=r"keeps no state \['x'\]"):
        LogLosses(base="nash_mtl").load_state_dict({"base_state": {"x": 1}})


def _two_layer(seed: int = 0, tasks: int = 3):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh()).double()
    heads = nn.ModuleList(nn.Linear(5, 1).double() for _ in range(tasks))
    x = torch.randn(16, 4, dtype=torch.float64)
    z = trunk(x)
    losses = [(h(z).squeeze(-1) - k).pow(2).mean() + 0.1 for k, h in enumerate(heads)]
    return trunk, heads, z, losses


def _grads(modules):
    return [p.grad.clone() for m in modules for p in m.parameters()]


@pytest.mark.parametrize("name", ["si_ls", "mgda_log"])
def test_the_heads_descend_the_log_losses(name):
    """backward() gives every head the gradient of sum_i log L_i (autograd of the log losses);
    SI-LS gives it to the trunk too."""
    trunk, heads, _, losses = _two_layer()
    torch.stack(losses).log().sum().backward()
    reference = {"trunk": _grads([trunk]), "heads": _grads([heads])}
    trunk, heads, _, losses = _two_layer()
    deconflict.backward(losses, trunk, deconflict.get(name))
    parts = ["heads", "trunk"] if name == "si_ls" else ["heads"]
    for part in parts:
        mine = _grads([trunk]) if part == "trunk" else _grads([heads])
        for a, b in zip(mine, reference[part], strict=True):
            assert_close_relative(a, b, 1e-13, f"{name} {part}")


@pytest.mark.parametrize("name", ["log_losses", "mgda_log", "cagrad_log", "imtl_g_log",
                                  "modo", "sdmgrad", "moco", "excess_mtl"])
def test_backward_in_every_mode_matches_aggregate(name):
    """Gramian mode (where the method needs only M), the Jacobian modes and aggregate give the
    same update (they differ by summation order only: well inside 1e-9 on this 3-task
    problem, whose weights are well conditioned)."""
    from deconflict.update import weighs_by_gramian

    def step(mode: str) -> torch.Tensor:
        trunk, heads, _, _ = _two_layer()
        if mode == "gramian":
            deconflict.track(trunk)
        z = trunk(torch.randn(16, 4, dtype=torch.float64))
        losses = [(h(z).squeeze(-1) - k).pow(2).mean() + 0.1 for k, h in enumerate(heads)]
        if mode == "aggregate":
            params = list(trunk.parameters())
            J = manual_jacobian(losses, params)
            return deconflict.aggregate(J, deconflict.get(name),
                                        losses=torch.stack(losses).detach())
        deconflict.backward(losses, trunk, deconflict.get(name), mode=mode)
        return torch.cat([p.grad.reshape(-1) for p in trunk.parameters()])

    reference = step("sequential")
    modes = ["batched", "aggregate"] + (["gramian"] if weighs_by_gramian(deconflict.get(name))
                                        else [])
    assert ("gramian" in modes) == (name not in ("moco", "excess_mtl"))
    for mode in modes:
        assert_close_relative(step(mode).numpy(), reference.numpy(), 1e-9, f"{name} {mode}")


# --------------------------------------------------------------------------------- COSMOS
def test_cosmos_golden():
    """r = (1/2, 1/2), L = (1, 0), lambda = 1: ||r|| = 1/sqrt 2, cos = 1/sqrt 2, and
    d cos / dL = r / (||r|| ||L||) - cos L / ||L||^2 = (0, 1/sqrt 2): c = (1/2, 1/2 - 1/sqrt 2).
    On the ray (L = t r) the penalty's gradient is zero: c = r."""
    c, diagnostics = COSMOS(lam=1.0).weights_with_diagnostics(losses=[1.0, 0.0])
    assert_close_relative(c.numpy(), [0.5, 0.5 - 1 / math.sqrt(2)], GOLDEN_RTOL)
    assert math.isclose(diagnostics["cosine"], 1 / math.sqrt(2), rel_tol=GOLDEN_RTOL)
    on_ray = COSMOS(lam=3.0, pref_vector=[1.0, 2.0]).weights(losses=[0.5, 1.0]).numpy()
    assert_close_relative(on_ray, [1.0, 2.0], GOLDEN_RTOL)
    assert_close_relative(COSMOS(lam=0.0).weights(losses=[3.0, 1.0]).numpy(), [0.5, 0.5],
                          GOLDEN_RTOL)
    with pytest.raises(deconflict.InvalidOptionError, match="every loss is 0"):
        COSMOS().weights(losses=[0.0, 0.0])


def test_cosmos_weights_are_the_gradient_of_its_objective():
    """c = df/dL against autograd of f = r . L - lambda cos(r, L) written directly, on random
    losses (both a few roundings of the same derivative); the penalty's part is orthogonal to
    L, and huge or tiny losses neither overflow nor underflow."""
    rng = np.random.default_rng(4)
    for _ in range(30):
        T = int(rng.integers(1, 6))
        r = rng.uniform(0.05, 2.0, T)
        lam = float(rng.uniform(0.0, 8.0))
        L = torch.tensor(rng.uniform(0.01, 5.0, T), dtype=torch.float64, requires_grad=True)
        rt = torch.from_numpy(r)
        f = rt @ L - lam * (rt @ L) / (rt.norm() * L.norm())
        (expected,) = torch.autograd.grad(f, L)
        c = COSMOS(lam=lam, pref_vector=r.tolist()).weights(losses=L.detach().numpy()).numpy()
        assert_close_relative(c, expected.numpy(), 64 * T * _EPS)
        assert abs((c - r) @ L.detach().numpy()) <= 64 * T * _EPS * (
            np.abs(c) + r) @ L.detach().numpy()
    big = COSMOS(lam=1.0).weights(losses=[1e300, 3e299]).numpy()
    small = COSMOS(lam=1.0).weights(losses=[1e-300, 3e-301]).numpy()
    assert np.isfinite(big).all() and np.isfinite(small).all()
    np.testing.assert_allclose(big, [0.5, 0.5], rtol=0, atol=1e-290)  # penalty ~ 1 / ||L||


def test_cosmos_matches_torchjds_scalarizer_through_backward():
    """backward() with COSMOS writes the gradient of TorchJD's COSMOS objective, which TorchJD
    differentiates by autograd: on the trunk and on every head."""
    S = pytest.importorskip("torchjd.scalarization")
    r = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    trunk, heads, _, losses = _two_layer()
    S.COSMOS(lambda_=2.5, weights=r)(torch.stack(losses)).backward()
    reference = _grads([trunk, heads])
    trunk, heads, _, losses = _two_layer()
    deconflict.backward(losses, trunk, COSMOS(lam=2.5, pref_vector=r.tolist()))
    worst = max(_relative(a.numpy(), b.numpy())
                for a, b in zip(_grads([trunk, heads]), reference, strict=True))
    assert worst <= 1e-12, worst


# ---------------------------------------------------------------------- Aligned-MTL-UB
def test_aligned_mtl_ub_aligns_the_representation_gradients():
    """backward(features=z): the trunk gets d z / d theta applied to sum_i c_i grad_z L_i, with
    c = Aligned-MTL's weights from the Gramian of the features' gradients (computed here with
    autograd, independently of the engine); the heads get their ordinary gradient."""
    trunk, heads, z, losses = _two_layer()
    Jz = manual_jacobian(losses, [z])
    c = deconflict.AlignedMTL().weights(Jz @ Jz.T).to(Jz.dtype)
    expected = torch.autograd.grad(z, list(trunk.parameters()), (c @ Jz).view_as(z),
                                   retain_graph=True)
    head_expected = torch.autograd.grad(sum(losses), list(heads.parameters()),
                                        retain_graph=True)
    record = deconflict.backward(losses, trunk, AlignedMTLUB(), features=z)
    for p, want in zip(trunk.parameters(), expected, strict=True):
        assert_close_relative(p.grad, want, 1e-12, "trunk")
    for p, want in zip(heads.parameters(), head_expected, strict=True):
        assert_close_relative(p.grad, want, 1e-13, "heads")
    aligned = (record.diagnostics["balance"].numpy() @ Jz.numpy())
    gram = aligned @ aligned.T  # orthogonal rows of equal norm (full-rank Gramian here)
    assert_close_relative(gram, gram[0, 0] * np.eye(3), 1e-10, "aligned Gramian")
    trunk, heads, z, losses = _two_layer()
    with pytest.raises(deconflict.InvalidOptionError, match="works on the shared "
                                                            "representation"):
        deconflict.backward(losses, trunk, AlignedMTLUB())


# -------------------------------------------------------------------------------- simplex
@settings(max_examples=80)
@given(seed=st.integers(0, 2**16), size=st.integers(1, 8),
       exponent=st.sampled_from([-30, 0, 30, 200]))
def test_simplex_projection_is_the_nearest_point(seed, size, exponent):
    """Pi(v) is on the simplex and satisfies the projection's KKT conditions: v - Pi(v) is a
    constant tau on the support and <= tau off it (checked to the rounding of the shift)."""
    v = np.random.default_rng(seed).standard_normal(size) * 10.0**exponent
    w = project_onto_simplex(v)
    assert (w >= 0).all() and abs(w.sum() - 1.0) <= 4 * size * _EPS
    gap = v - w
    support = w > 0
    tau = gap[support].mean()
    scale = 4 * size * _EPS * max(np.abs(v).max(), 1.0)
    assert np.abs(gap[support] - tau).max() <= scale
    assert (gap[~support] <= tau + scale).all()


# ----------------------------------------------------------------------------------- MoCo
def _moco_reference(steps, beta=0.5, beta_sigma=0.5, gamma_=0.1, gamma_sigma=0.5, rho=0.0,
                    normalize=True, softmax=False):
    """The paper's Algorithm 1 / LibMTL's recursion, written out in torch float64 with an
    independent simplex projection (bisection on the threshold tau)."""

    def project(v):
        low, high = float(v.min()) - 1.0, float(v.max())
        for _ in range(200):
            tau = (low + high) / 2
            low, high = (tau, high) if (v - tau).clamp(min=0).sum() > 1 else (low, tau)
        return (v - (low + high) / 2).clamp(min=0)

    T = steps[0][0].shape[0]
    y = torch.zeros_like(steps[0][0])
    lam = torch.full((T,), 1.0 / T, dtype=torch.float64)
    out = []
    for k, (J, L) in enumerate(steps, start=1):
        h = J / J.norm(dim=1, keepdim=True) * L[:, None] if normalize else J
        y = y - beta / k**beta_sigma * (y - h)
        ridge = rho * torch.eye(T, dtype=torch.float64)
        target = lam - gamma_ / k**gamma_sigma * (y @ y.T + ridge) @ lam
        lam = torch.softmax(target, 0) if softmax else project(target)
        out.append(y.T @ lam)
    return out


@pytest.mark.parametrize("options", [{}, {"lambda_update": "softmax"},
                                     {"normalize": False, "rho": 0.3, "gamma": 0.5}],
                         ids=["paper", "libmtl", "raw"])
def test_moco_follows_its_recursion(options):
    """20 steps against the recursion written out (projection by bisection): the same
    arithmetic up to the order of a few sums, so to ~1e-13 relative (the recursion contracts:
    beta_k and the projection are 1-Lipschitz, so differences do not grow)."""
    rng = np.random.default_rng(2)
    steps = [(torch.from_numpy(rng.standard_normal((3, 7))),
              torch.from_numpy(np.exp(rng.standard_normal(3)))) for _ in range(20)]
    renamed = {"normalize": options.get("normalize", True), "rho": options.get("rho", 0.0),
               "gamma_": options.get("gamma", 0.1),
               "softmax": options.get("lambda_update") == "softmax"}
    expected = _moco_reference(steps, **renamed)
    method = MoCo(**options)
    worst = 0.0
    for (J, L), want in zip(steps, expected, strict=True):
        got = deconflict.aggregate(J, method, losses=L, block_sizes=[3, 4]).numpy()
        worst = max(worst, _relative(got, want.numpy()))
    assert worst <= 1e-12, worst


def test_moco_golden_and_resume():
    """The first step by hand (the docstring's numbers): y = ((1/2, 0), (0, 3/2)),
    lambda = Pi((0.4875, 0.3875)) = (0.55, 0.45), D = (0.275, 0.675); then a resumed run
    (torch.save / torch.load(weights_only=True)) continues bitwise."""
    J = np.array([[2.0, 0.0], [0.0, 1.0]])
    method = MoCo()
    assert_close_relative(update(method, J, losses=[1.0, 3.0]), [0.275, 0.675], GOLDEN_RTOL)
    assert_close_relative(method.state_dict()["lambda"].numpy(), [0.55, 0.45], GOLDEN_RTOL)
    rng = np.random.default_rng(6)
    steps = [(rng.standard_normal((3, 5)), np.exp(rng.standard_normal(3))) for _ in range(10)]
    straight = MoCo()
    expected = [update(straight, J, losses=L) for J, L in steps]
    first = MoCo()
    got = [update(first, J, losses=L) for J, L in steps[:4]]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = MoCo()
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got += [update(resumed, J, losses=L) for J, L in steps[4:]]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(deconflict.ShapeError, match="changed shape"):
        update(resumed, np.ones((3, 4)), losses=[1.0, 1.0, 1.0])


# ------------------------------------------------------------------------- MoDo, SDMGrad
def test_modo_golden():
    """lambda = (1/2, 1/2), M = diag(1, 4), gamma = rho = 0.1: lambda - gamma (M lambda + rho
    lambda) = (0.445, 0.295), whose projection adds tau = 0.13 to each: (0.575, 0.425). The
    second step from there: (0.575, 0.425) - 0.1 ((0.575, 1.7) + 0.1 (0.575, 0.425)) =
    (0.51175, 0.25075), + 0.11875 each: (0.6305, 0.3695)."""
    method = MoDo()
    assert_close_relative(method.weights(np.diag([1.0, 4.0])).numpy(), [0.575, 0.425],
                          GOLDEN_RTOL)
    assert_close_relative(method.weights(np.diag([1.0, 4.0])).numpy(), [0.6305, 0.3695],
                          GOLDEN_RTOL)


def test_sdmgrad_golden():
    """M = diag(1, 9): the mean norm is 2, A = diag(1/4, 9/4). From w = (1/2, 1/2) with
    lambda = 0, one step of lr 1: w - A w = (3/8, -5/8), projected (tau = -5/8: the support
    is the first task alone): (1, 0). With lambda = 1 and w~ = (1/2, 1/2), the
    weights are (w + w~) / 2 = (3/4, 1/4)."""
    method = SDMGrad(lr=1.0, n_iter=1, lam=0.0)
    assert_close_relative(method.weights(np.diag([1.0, 9.0])).numpy(), [1.0, 0.0], GOLDEN_RTOL)
    method = SDMGrad(lr=1.0, n_iter=1, lam=1.0)
    # Gradient A (w + w~) = A (1, 1) = (1/4, 9/4): w - (1/4, 9/4) = (1/4, -7/4) -> (1, 0).
    assert_close_relative(method.weights(np.diag([1.0, 9.0])).numpy(), [0.75, 0.25],
                          GOLDEN_RTOL)


def _gramian_sequence(count: int, scale: float = 1.0):
    rng = np.random.default_rng(11)
    T = 4
    return [scale * (J @ J.T) for J in (rng.standard_normal((T, 9)) for _ in range(count))]


def test_modo_matches_torchjd():
    """The same recursion (a matrix product, a projection) on the same Gramians: they differ
    in the order of T-term sums only, ~T eps per step; the projection is 1-Lipschitz and the
    step lambda - gamma (M + rho I) lambda has norm at most 1 + gamma (||M|| + rho), so 30
    steps stay far inside 1e-10."""
    A = pytest.importorskip("torchjd.aggregation")
    for gamma_, rho in ((0.1, 0.1), (0.02, 0.0)):
        theirs, mine = A.MoDoWeighting(gamma=gamma_, rho=rho), MoDo(gamma=gamma_, rho=rho)
        worst = 0.0
        for M in _gramian_sequence(30):
            reference = theirs(torch.from_numpy(M)).numpy()
            worst = max(worst, _relative(mine.weights(M).numpy(), reference))
        assert worst <= 1e-10, worst


def test_sdmgrad_matches_torchjd_where_its_1e_8_is_negligible():
    """TorchJD normalizes by (mean norm)^2 + 1e-8; with norms ~1e4 the 1e-8 is 1e-16 of the
    square, below rounding, so both run the same 20 projected momentum steps per call: they
    agree to a few eps times the steps' amplification (1 + lr ||A||)."""
    A = pytest.importorskip("torchjd.aggregation")
    theirs, mine = A.SDMGradWeighting(), SDMGrad()
    worst = 0.0
    for M in _gramian_sequence(15, scale=1e8):
        reference = theirs(torch.from_numpy(M)).numpy()
        worst = max(worst, _relative(mine.weights(M).numpy(), reference))
    assert worst <= 1e-9, worst


@settings(max_examples=40)
@given(J=jacobians(kinds=("random", "conflicting", "norm_spread")))
def test_sdmgrad_and_modo_weights_stay_on_the_simplex(J):
    """MoDo's lambda and SDMGrad's w are projections onto the simplex; SDMGrad's returned
    weights are a convex combination of w and w~, so non-negative and summing to 1."""
    M = J @ J.T
    for method in (MoDo(), SDMGrad()):
        c = method.weights(M).numpy()
        assert (c >= 0).all() and abs(c.sum() - 1.0) <= 16 * J.shape[0] * _EPS


# ------------------------------------------------------------------------------ ExcessMTL
def test_excess_mtl_golden():
    """First step: S = g^2, e_i = sum_j g_ij^2 / sqrt(g_ij^2 + 1e-7) ~ (2, 1), used raw:
    w = softmax(log(1/2) + e) = (e/(e + 1), 1/(e + 1)) with e = exp(1) (to 1e-8, from the
    1e-7 terms). Second step with the same J: S = 2 g^2, e = (2, 1) / sqrt 2 divided by the
    baseline (2, 1): (1, 1) / sqrt 2 for both, so the ratio of the weights stays e."""
    J = np.array([[2.0, 0.0], [0.0, 1.0]])
    method = ExcessMTL()
    e = math.e
    assert_close_relative(update(method, J), [2 * e / (e + 1), 1 / (e + 1)], 1e-7)
    _, diagnostics = method.combine_jacobian([torch.from_numpy(J)], losses=None)
    w = diagnostics["task_weights"]
    assert_close_relative(diagnostics["excess"], [2**-0.5, 2**-0.5], 1e-7)
    assert math.isclose(w[0] / w[1], e, rel_tol=1e-7)


@pytest.mark.parametrize("warmup", [0, 3])
def test_excess_mtl_matches_torchjd(warmup):
    """TorchJD's ExcessMTL on the same Jacobians: the same operations entry by entry (squares,
    sums, a softmax), so the updates agree to a few roundings per step."""
    A = pytest.importorskip("torchjd.aggregation")
    rng = np.random.default_rng(12)
    theirs, mine = A.ExcessMTL(n_warmup_steps=warmup), ExcessMTL(n_warmup_steps=warmup)
    worst = 0.0
    for _ in range(20):
        J = torch.from_numpy(rng.standard_normal((3, 8)))
        worst = max(worst, _relative(update(mine, J.numpy()), theirs(J).numpy()))
    assert worst <= 1e-13, worst


def test_excess_mtl_resumes_exactly():
    rng = np.random.default_rng(13)
    steps = [rng.standard_normal((3, 6)) for _ in range(10)]
    expected = [update(m, J) for m in [ExcessMTL(n_warmup_steps=2)] for J in steps]
    first = ExcessMTL(n_warmup_steps=2)
    got = [update(first, J) for J in steps[:3]]
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = ExcessMTL(n_warmup_steps=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got += [update(resumed, J) for J in steps[3:]]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ shared properties
@pytest.mark.parametrize("name", ["log_losses", "mgda_log", "imtl_g_log", "si_ls", "sdmgrad",
                                  "excess_mtl"])
@settings(max_examples=40)
@given(J=jacobians())
def test_the_non_conflicting_ones_never_conflict(name, J):
    """MGDA and IMTL-G on log losses keep their bases' guarantee (the unit gradients are the
    same); SI-LS, SDMGrad and ExcessMTL are not claimed non-conflicting: only their updates'
    finiteness is asserted for them here."""
    losses = np.linspace(0.5, 2.0, J.shape[0])
    D = quiet(deconflict.get(name), J, losses=losses)
    assert np.isfinite(D).all()
    if name in ("log_losses", "mgda_log", "imtl_g_log"):
        assert_non_conflicting(J, D)


@pytest.mark.parametrize("name", NEW)
def test_every_new_method_through_the_cli(name, tmp_path, capsys):
    """One smoke run per method on xor-and (positive losses: the log variants need them), with
    every option at its default: the record names the method."""
    import json

    from deconflict.cli import main

    common = ["--smoke", "--quiet", "--set", "max_epochs=2", "--out", str(tmp_path)]
    assert main(["run", "xor-and", "--method", name, *common]) == 0
    (record,) = tmp_path.rglob("*.json")
    assert json.loads(record.read_text())["method"] == name
    capsys.readouterr()
