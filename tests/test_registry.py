"""The registry: names, options, errors."""

from __future__ import annotations

import pytest

import deconflict

FOUNDATION = ("sum", "mean", "gradops", "pcgrad", "mgda", "cagrad", "cagrad_fast", "imtl_g",
              "tensioner")


@pytest.mark.parametrize("name", FOUNDATION)
def test_every_foundation_method_is_registered_and_described(name):
    method = deconflict.get(name)
    assert method.name == name
    assert method.summary and method.paper
    assert method.family in ("scalarization", "projection", "multi-objective", "loss weighting")


def test_get_passes_options():
    method = deconflict.get("gradops", alpha=-1)
    assert isinstance(method, deconflict.GradOPS) and method.alpha == -1.0
    assert repr(method) == "GradOPS(alpha=-1.0, gating='per_task', dependence_tol=1e-06)"


def test_names_forgive_case_and_hyphens():
    assert isinstance(deconflict.get("CAGrad-Fast"), deconflict.CAGradFast)


def test_unknown_name_lists_every_known_method():
    with pytest.raises(deconflict.UnknownMethodError) as error:
        deconflict.get("nashmtl")
    for name in FOUNDATION:
        assert name in str(error.value)


def test_unknown_option_lists_the_accepted_ones():
    with pytest.raises(deconflict.InvalidOptionError, match="its options are: c, rescale"):
        deconflict.get("cagrad", alpha=0.4)
    with pytest.raises(deconflict.InvalidOptionError, match="its options are: none"):
        deconflict.get("mean", weights=[1, 2])


def test_errors_are_value_errors():
    with pytest.raises(ValueError):  # noqa: PT011 - the point is the base class
        deconflict.get("nope")


def test_stateless_methods_reject_state():
    with pytest.raises(deconflict.InvalidOptionError, match="stateless"):
        deconflict.GradOPS().load_state_dict({"x": 1})
    assert deconflict.GradOPS().state_dict() == {}
