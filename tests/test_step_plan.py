"""The step plan, without autograd: every combination of ``backward``'s options that cannot run
is refused by ``plan_step`` (error type and message), and what ``mode="auto"`` resolves to for
each method protocol, tracked or not, with or without features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deconflict
from deconflict.distributed import NO_REDUCER, ProcessGroupReducer, reducer_for
from deconflict.errors import InvalidOptionError
from deconflict.plan import StepPlan, plan_step
from deconflict.resolve import resolve_method
from deconflict.scaling import LossScale


def tracker() -> deconflict.LayerTracker:
    return deconflict.track(nn.Linear(2, 2))


EXACT = ProcessGroupReducer("exact")
LOCAL = ProcessGroupReducer("local")

# (method name and options, plan_step keywords, message fragment); every row is an
# InvalidOptionError.
REFUSED = [
    (("upgrad", {}), {"head_weights": "none"}, "head_weights must be 'auto', 'unit' or"),
    (("upgrad", {}), {"mode": "vectorized"}, "mode must be one of"),
    (("upgrad", {}), {"mode": "batched", "chunk_size": 0}, "chunk_size must be a positive"),
    (("upgrad", {}), {"mode": "batched", "chunk_size": 1.5}, "chunk_size must be a positive"),
    (("upgrad", {}), {"mode": "batched", "chunk_size": True}, "chunk_size must be a positive"),
    (("upgrad", {}), {"mode": "sequential", "chunk_size": 2}, "chunk_size applies to"),
    (("mgda_ub", {}), {}, "mgda_ub works on the shared representation: pass features="),
    (("upgrad", {}), {"compute_gramian": False}, "upgrad needs the per-task gradients"),
    (("graddrop", {}), {"compute_gramian": False}, "graddrop needs the per-task gradients"),
    (("upgrad", {}), {"mode": "gramian", "features": True, "tracked": True},
     "does not combine with features="),
    (("graddrop", {}), {"mode": "gramian", "tracked": True},
     r"graddrop needs more than the Gramian \(a JacobianAggregator\)"),
    (("gradvac", {"granularity": "layer"}), {"mode": "gramian", "tracked": True},
     r"gradvac needs more than the Gramian \(a BlockWeighting\)"),
    (("upgrad", {}), {"mode": "gramian"}, r"call tracker = deconflict\.track\(trunk\)"),
    (("mean", {}), {"mode": "gramian"}, r"call tracker = deconflict\.track\(trunk\)"),
    (("sum", {}), {"head_weights": "unit"}, "pass compute_gramian=True for head_weights='unit'"),
    (("gradnorm", {}), {"head_weights": "unit"}, "pass compute_gramian=True"),
    (("graddrop", {}), {"head_weights": "method"}, "needs task weights, and graddrop has none"),
    (("db_mtl", {}), {"head_weights": "method"}, "needs task weights, and db_mtl has none"),
    (("gradvac", {"granularity": "layer"}), {"head_weights": "method"},
     "needs task weights, and gradvac has none"),
    (("upgrad", {}), {"mode": "gramian", "tracked": True, "reducer": EXACT},
     "distributed='exact' needs each task's gradient on every rank"),
    (("upgrad", {}), {"tracked": True, "reducer": EXACT},  # auto would choose "gramian"
     r"for mode='auto', untrack the trunk"),
    (("mean", {}), {"mode": "gramian", "tracked": True, "reducer": EXACT,
                    "compute_gramian": True}, "distributed='exact' needs each task's gradient"),
]


def plan(name: str, options: dict, **keywords) -> StepPlan:
    if keywords.pop("tracked", False):
        keywords["tracker"] = tracker()
    return plan_step(deconflict.get(name, **options), **keywords)


@pytest.mark.parametrize(("method", "keywords", "message"), REFUSED,
                         ids=[f"{m[0]}-{'-'.join(map(str, k))}" for m, k, _ in REFUSED])
def test_every_invalid_combination_is_refused_by_the_plan(method, keywords, message):
    with pytest.raises(InvalidOptionError, match=message):
        plan(*method, **keywords)


def test_the_neighbours_of_refused_combinations_are_accepted():
    """Each refusal is for the combination, not for one of its options."""
    assert plan("sum", {}, head_weights="unit", compute_gramian=True).source == "jacobian"
    assert plan("upgrad", {}, mode="batched", chunk_size=2).chunk_size == 2
    assert plan("upgrad", {}, mode="sequential", chunk_size=1).chunk_size == 1
    assert plan("mgda_ub", {}, features=True).source == "features"
    assert plan("mean", {}, compute_gramian=False).source == "weighted"
    assert plan("gradvac", {}, mode="gramian", tracked=True).source == "tracked"
    assert plan("gradvac", {}, head_weights="method").head_weights == "method"
    # Loss weighting never forms per-task gradients, so exact data parallelism is possible.
    assert plan("mean", {}, mode="gramian", tracked=True, reducer=EXACT).source == "weighted"
    assert plan("upgrad", {}, mode="gramian", tracked=True, reducer=LOCAL).source == "tracked"
    assert plan("upgrad", {}, tracked=True, reducer=EXACT, mode="batched").exchanges


# (method, options) -> for (tracked, features): (mode, source)
AUTO = {
    ("upgrad", ()): {(False, False): ("sequential", "jacobian"),
                     (True, False): ("gramian", "tracked"),
                     (False, True): ("sequential", "features"),
                     (True, True): ("sequential", "features")},
    ("gradvac", ()): {(False, False): ("sequential", "jacobian"),
                      (True, False): ("gramian", "tracked"),
                      (False, True): ("sequential", "features"),
                      (True, True): ("sequential", "features")},
    ("gradvac", (("granularity", "layer"),)): {(False, False): ("sequential", "jacobian"),
                                               (True, False): ("sequential", "jacobian"),
                                               (False, True): ("sequential", "features"),
                                               (True, True): ("sequential", "features")},
    ("graddrop", ()): {(False, False): ("sequential", "jacobian"),
                       (True, False): ("sequential", "jacobian"),
                       (False, True): ("sequential", "features"),
                       (True, True): ("sequential", "features")},
    ("mean", ()): {(False, False): ("sequential", "weighted"),
                   (True, False): ("gramian", "weighted"),
                   (False, True): ("sequential", "weighted"),
                   (True, True): ("sequential", "weighted")},
    ("gradnorm", ()): {(False, False): ("sequential", "weighted"),
                       (True, False): ("gramian", "weighted"),
                       (False, True): ("sequential", "weighted"),
                       (True, True): ("sequential", "weighted")},
}


@pytest.mark.parametrize("method", list(AUTO), ids=[f"{n}{dict(o)}" for n, o in AUTO])
def test_auto_mode_for_each_protocol_tracked_and_features(method):
    name, options = method
    for (tracked, features), (mode, source) in AUTO[method].items():
        result = plan(name, dict(options), tracked=tracked, features=features)
        assert (result.mode, result.source) == (mode, source), (tracked, features)
        assert result.record_mode == ("losses" if source == "weighted" else mode)
        assert result.features == features
        assert result.chunk_size == (1 if mode == "sequential" else None)


def test_the_plan_says_when_heads_come_first_and_what_is_exchanged():
    # The heads' gradient needs no weights unless they are the method's (or loss weighting).
    assert plan("upgrad", {}).heads_first
    assert not plan("upgrad", {}, head_weights="method").heads_first
    assert not plan("mean", {}, compute_gramian=True).heads_first
    # Exact mode exchanges the per-task blocks, and GradNorm's last-layer blocks.
    assert plan("upgrad", {}, reducer=EXACT).exchanges
    assert plan("gradnorm", {}, reducer=EXACT).exchanges and plan("gradnorm", {}).last_layer
    assert not plan("mean", {}, reducer=EXACT).exchanges
    assert not plan("upgrad", {}, reducer=LOCAL).exchanges
    assert not plan("upgrad", {}).exchanges


def test_the_plan_says_how_many_sweeps_gramian_mode_may_take():
    """mode="gramian" bounds its memory (up to ``DEFAULT_MAX_SWEEPS`` sweeps), auto's Gramian
    mode is the fast one (one sweep); a tracker's own ``max_sweeps`` applies to both."""
    from deconflict.tracking import DEFAULT_MAX_SWEEPS

    upgrad = resolve_method("upgrad")
    default = tracker()
    assert plan_step(upgrad, mode="gramian", tracker=default).max_sweeps == DEFAULT_MAX_SWEEPS
    assert plan_step(upgrad, mode="auto", tracker=default).max_sweeps == 1
    assert plan_step(upgrad, mode="sequential", tracker=default).max_sweeps == 1
    assert plan_step(resolve_method("mean"), mode="auto", tracker=default).max_sweeps == 1
    default.remove()
    for value in (1, 3):
        chosen = deconflict.track(nn.Linear(2, 2), max_sweeps=value)
        assert plan_step(upgrad, mode="gramian", tracker=chosen).max_sweeps == value
        assert plan_step(upgrad, mode="auto", tracker=chosen).max_sweeps == value
        chosen.remove()
    assert plan_step(upgrad).max_sweeps == 1


def test_the_plan_is_frozen():
    result = plan("upgrad", {})
    with pytest.raises(AttributeError):
        result.mode = "batched"  # type: ignore[misc]


def test_reducers_and_loss_scales_are_values_built_before_the_plan():
    assert reducer_for(None) is NO_REDUCER and not NO_REDUCER.exact
    assert reducer_for(EXACT) is EXACT
    with pytest.raises(InvalidOptionError, match="distributed must be 'exact', 'local' or None"):
        reducer_for("everywhere")
    with pytest.raises(InvalidOptionError, match="distributed must be"):
        ProcessGroupReducer("everywhere")
    with pytest.raises(InvalidOptionError, match="process_group is given but distributed is"):
        reducer_for(None, process_group=object())
    with pytest.raises(InvalidOptionError, match="process_group is given with a reducer"):
        reducer_for(EXACT, process_group=object())
    with pytest.raises(InvalidOptionError, match=r"needs torch\.distributed initialized"):
        reducer_for("exact")
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    assert LossScale.of(disabled) == LossScale.of(None) and not LossScale.of(None).skips_overflow
    scale = LossScale.of(torch.amp.GradScaler("cpu", init_scale=8.0))
    assert scale.factor == 8.0 and scale.skips_overflow
    M = torch.tensor([[64.0, -8.0], [-8.0, 128.0]], dtype=torch.float64)
    assert torch.equal(scale.gramian(M), M / 64)  # exact: 8 is a power of two
    assert torch.equal(scale.scaled(scale.unscaled(M)), M)


def test_a_stateful_method_by_name_is_refused():
    with pytest.raises(InvalidOptionError, match="create it once"):
        resolve_method("famo")
    with pytest.raises(TypeError, match="must be a deconflict Method"):
        resolve_method(3)  # type: ignore[arg-type]
