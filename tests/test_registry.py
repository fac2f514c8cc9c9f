"""The registry: names, options, errors."""

from __future__ import annotations

import numpy as np
import pytest

import deconflict
from deconflict.methods import (
    AfterStep,
    BlockWeighting,
    EpochEnd,
    GramianWeighting,
    JacobianAggregator,
    LossWeighting,
)
from deconflict.methods.registry import method_class

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


# ------------------------------------------------------------------------------ protocols
PROTOCOLS = (GramianWeighting, BlockWeighting, JacobianAggregator, LossWeighting)


@pytest.mark.parametrize("name", deconflict.available())
def test_every_method_follows_exactly_one_protocol(name):
    method = deconflict.get(name)
    assert sum(isinstance(method, protocol) for protocol in PROTOCOLS) == 1
    if isinstance(method, LossWeighting):
        expected = {"none": "losses only", "last_layer": "last-layer Gramian",
                    "shared": "Gramian"}[method.gradient_scope]
    elif isinstance(method, BlockWeighting):
        expected = "Gramian" if method.single_group else "Gramian per layer"
    elif isinstance(method, GramianWeighting):
        expected = "Gramian"
    else:
        expected = "task gradients"
    assert method.inputs == expected


def test_the_loss_scope_and_block_grouping_follow_the_options():
    assert deconflict.GradNorm(norms_on="shared").inputs == "Gramian"
    layered = deconflict.GradVac(granularity="layer")
    assert not layered.single_group and layered.inputs == "Gramian per layer"


def test_training_loop_callbacks_are_declared_protocols():
    after = [name for name in deconflict.available()
             if isinstance(deconflict.get(name), AfterStep)]
    epoch = [name for name in deconflict.available()
             if isinstance(deconflict.get(name), EpochEnd)]
    assert after == ["famo"] and epoch == ["dwa"]


def test_jacobian_aggregators_refuse_a_gramian():
    for method in (deconflict.GradDrop(), deconflict.DBMTL()):
        with pytest.raises(deconflict.InvalidOptionError, match="task gradients themselves"):
            method.weights(np.eye(2), losses=[1.0, 2.0])
        with pytest.raises(deconflict.InvalidOptionError, match="task gradients themselves"):
            method.weights_with_diagnostics(np.eye(2), losses=[1.0, 2.0])


def test_a_gramian_weighting_needs_the_gramian():
    with pytest.raises(deconflict.ShapeError, match="needs the Gramian"):
        deconflict.MGDA().weights(None, losses=[1.0, 2.0])
    with pytest.raises(deconflict.ShapeError, match="needs the Gramian"):
        deconflict.GradNorm().weights(losses=[1.0, 2.0])  # its scope asks for one


def test_single_group_gradvac_gives_its_group_diagnostics():
    M = np.array([[1.0, -0.5], [-0.5, 1.25]])
    c, diagnostics = deconflict.GradVac(seed=0).weights_with_diagnostics(M)
    blocks, block_diagnostics = deconflict.GradVac(seed=0).block_weights(M[None])
    np.testing.assert_array_equal(c.numpy(), blocks[0])
    assert tuple(diagnostics["targets"].shape) == (2, 2)
    np.testing.assert_array_equal(diagnostics["targets"].numpy(), block_diagnostics["targets"][0])


# -------------------------------------------------------------------------------- options
def _annotation(option) -> str:
    scalar = option.type
    text = {"scalar": scalar, "list": f"tuple[{scalar}, ...]",
            "scalar_or_list": f"{scalar} | tuple[{scalar}, ...]"}[option.shape]
    return text + (" | None" if option.nullable else "")


@pytest.mark.parametrize("name", deconflict.available())
def test_the_option_attributes_are_typed_as_declared(name):
    """Each option's attribute is annotated with the type its declaration validates to (what
    mypy checks the methods against), so the annotation cannot drift from OPTIONS."""
    cls = method_class(name)
    annotations = {}
    for klass in reversed(cls.__mro__):
        annotations.update(getattr(klass, "__annotations__", {}))
    for option in cls.OPTIONS:
        assert annotations.get(option.key) == _annotation(option), option.name


@pytest.mark.parametrize("name", deconflict.available())
def test_every_default_validates_to_the_value_the_instance_keeps(name):
    cls = method_class(name)
    method = cls()
    for option in cls.OPTIONS:
        assert getattr(method, option.key) == option.validate(name, option.default)


def test_options_are_validated_by_their_declaration_only():
    with pytest.raises(deconflict.InvalidOptionError, match="seed must be an int or None"):
        deconflict.PCGrad(seed=1.5)
    with pytest.raises(deconflict.InvalidOptionError, match=r"beta must be in \[0, 1\]"):
        deconflict.GradVac(beta=2.0)
