"""The statistics layer of compare and sweep: summaries over seeds and paired comparisons."""

from __future__ import annotations

import math

import numpy as np
import pytest
from properties import gamma
from scipy import stats

import deconflict
from deconflict.experiments.statistics import (
    Paired,
    Summary,
    UnpairedError,
    bootstrap_interval,
    paired,
    summarize_values,
)


# ------------------------------------------------------------------------------- summaries
def test_summary_of_three_values_by_hand():
    s = summarize_values([1.0, 2.0, 3.0])
    # mean 2, s^2 = ((1-2)^2 + 0 + (3-2)^2) / (3 - 1) = 1, SE = 1 / sqrt(3)
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    assert s.se == pytest.approx(1.0 / math.sqrt(3.0), rel=gamma(8))
    assert s.cell() == "2.0000 +- 0.5774 (3)"


def test_summary_skips_non_finite_values_and_counts_only_the_rest():
    s = summarize_values([4.0, float("nan"), None, 6.0, float("inf")])
    assert (s.n, s.mean, s.se) == (2, 5.0, 1.0)  # s = sqrt(2), SE = sqrt(2) / sqrt(2)


def test_one_seed_has_no_standard_error_and_none_has_no_mean():
    one = summarize_values([0.25])
    assert (one.n, one.mean, one.std, one.se) == (1, 0.25, None, None)
    assert one.cell() == "0.2500 (n = 1)"
    none = summarize_values([float("nan")])
    assert none.n == 0 and math.isnan(none.mean) and none.cell() == "-"
    assert Summary.of([]).cell() == "-"


def test_large_metrics_are_shown_with_one_decimal():
    assert summarize_values([120.0, 130.0]).cell() == "125.0 +- 5.0 (2)"


# ---------------------------------------------------------------------------- paired tests
def test_paired_comparison_by_hand():
    """d = (0.5, 1, 1): mean 5/6, s_d = sqrt(1/12), SE = 1/6, t = 5 with 2 degrees of freedom.

    Student's t with 2 degrees of freedom has the closed-form CDF 1/2 + t / (2 sqrt(2 + t^2)),
    so the two-sided p-value is 1 - t / sqrt(2 + t^2) = 1 - 5 / sqrt(27).
    """
    result = paired({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.5, 1: 1.0, 2: 3.0})
    rtol = 10 * gamma(16)
    assert result.n == 3
    assert result.difference == pytest.approx(5.0 / 6.0, rel=rtol)
    assert result.se == pytest.approx(1.0 / 6.0, rel=rtol)
    assert result.t == pytest.approx(5.0, rel=rtol)
    # scipy's t distribution is accurate to about 1e-12 relative here (its own tests).
    assert result.p_value == pytest.approx(1.0 - 5.0 / math.sqrt(27.0), rel=1e-9)
    # Three differences: every resample mean is a multiple of 1/6 between 0.5 and 1, and the
    # extremes (all 0.5: probability 1/27; all 1: 8/27) hold more than 2.5% each.
    assert result.ci == (0.5, 1.0)


def test_t_statistic_matches_the_formula():
    rng = np.random.default_rng(7)
    n = 12
    baseline = rng.normal(0.8, 0.05, n)
    method = baseline + rng.normal(0.01, 0.02, n)
    result = paired(dict(enumerate(method)), dict(enumerate(baseline)))
    d = method - baseline
    mean = d.sum() / n
    s = math.sqrt(((d - mean) ** 2).sum() / (n - 1))
    by_hand = mean / (s / math.sqrt(n))
    # Both evaluate the same sums in some order: each term errs by gamma(4n) times the sums'
    # condition numbers (sum |d| / |sum d| for the mean, sum d^2 / sum (d - mean)^2 for s^2).
    condition = np.abs(d).sum() / abs(d.sum()) + (d ** 2).sum() / ((d - mean) ** 2).sum()
    assert result.t == pytest.approx(by_hand, rel=10 * gamma(4 * n) * condition)
    assert result.t == pytest.approx(stats.ttest_rel(method, baseline).statistic,
                                     rel=10 * gamma(4 * n) * condition)
    assert result.se == pytest.approx(s / math.sqrt(n), rel=10 * gamma(4 * n) * condition)


def test_two_pairs_give_the_two_differences_as_the_interval():
    """n = 2: the resample means are d1, (d1 + d2) / 2 and d2 with probabilities 1/4, 1/2,
    1/4, so the 2.5% and 97.5% quantiles of 10,000 of them are d1 and d2 (a count of d1 below
    250 of 10,000 draws of probability 1/4 is more than 50 standard deviations away)."""
    result = paired({3: 0.70, 4: 0.72}, {3: 0.69, 4: 0.70})
    low, high = result.ci
    assert low == pytest.approx(0.01, abs=4 * gamma(2)) and high == pytest.approx(0.02, abs=4 *
                                                                                   gamma(2))
    # ... but with one degree of freedom the t-test does not separate them: t = 3, and Student's
    # t with 1 degree of freedom is Cauchy, so p = 1 - 2 atan(3) / pi = 0.205. The verdict needs
    # both.
    assert result.t == pytest.approx(3.0, rel=1e-12)
    assert result.p_value == pytest.approx(1.0 - 2.0 * math.atan(3.0) / math.pi, rel=1e-9)
    assert result.verdict(higher_is_better=True) == "no difference shown"


def test_the_verdict_follows_the_metric_direction_when_interval_and_test_agree():
    result = paired({0: 0.70, 1: 0.72, 2: 0.71}, {0: 0.69, 1: 0.70, 2: 0.695})  # d = .01,.02,.015
    assert result.ci[0] > 0 and result.p_value < 0.05
    assert result.verdict(higher_is_better=True) == "better"
    assert result.verdict(higher_is_better=False) == "worse"


def test_bootstrap_is_seeded_and_reproducible():
    d = np.random.default_rng(1).normal(size=15)
    assert bootstrap_interval(d) == bootstrap_interval(d)
    assert bootstrap_interval(d, seed=1) != bootstrap_interval(d, seed=2)
    low, high = bootstrap_interval(d)
    assert d.min() <= low < d.mean() < high <= d.max()


def test_bootstrap_interval_matches_the_normal_interval_for_many_seeds():
    """For n = 400 normal differences the percentile interval is close to mean +- 1.96 SE.

    Monte Carlo error of a 2.5% quantile of 10,000 resamples: sqrt(0.025 0.975 / 1e4) /
    phi(1.96) = 0.027 SE; the bootstrap's plug-in s (ddof 0) and the sample's skewness add
    less than 0.01 SE at n = 400. 0.15 SE is more than four Monte Carlo deviations.
    """
    d = np.random.default_rng(3).normal(0.3, 1.0, 400)
    se = d.std(ddof=1) / math.sqrt(d.size)
    low, high = bootstrap_interval(d)
    assert low == pytest.approx(d.mean() - 1.959964 * se, abs=0.15 * se)
    assert high == pytest.approx(d.mean() + 1.959964 * se, abs=0.15 * se)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """200 samples of n = 20 normal differences with mean 1: the percentile interval's
    coverage is about 0.93 at this n (it is slightly too narrow: s / sqrt(n) with ddof 0 and
    normal rather than t quantiles); the binomial spread of 200 trials is 0.018, so [0.85,
    0.99] holds it with four deviations to spare on each side."""
    rng = np.random.default_rng(11)
    hits = 0
    for trial in range(200):
        d = rng.normal(1.0, 2.0, 20)
        low, high = bootstrap_interval(d, resamples=2_000, seed=trial)
        hits += low <= 1.0 <= high
    assert 0.85 <= hits / 200 <= 0.99


def test_identical_differences_have_no_spread_and_no_t_statistic():
    result = paired({0: 2.0, 1: 3.0, 2: 4.0}, {0: 1.5, 1: 2.5, 2: 3.5})
    assert (result.n, result.difference, result.se) == (3, 0.5, 0.0)
    assert result.t is None and result.p_value is None
    assert result.ci == (0.5, 0.5)
    assert result.verdict(higher_is_better=False) == "worse"
    assert result.cell(higher_is_better=False) == "+0.5000 [+0.5000, +0.5000], p -: worse"


def test_tiny_differences_keep_their_significant_digits():
    result = paired({0: 1.00003, 1: 1.00003}, {0: 1.0, 1: 1.0})
    assert result.cell(higher_is_better=True).startswith("+3.0e-05 [+3.0e-05, +3.0e-05]")


def test_no_difference_shown_when_the_interval_contains_zero():
    result = paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 1.0, 2: 3.0})  # d = -1, 1, 0
    assert result.difference == 0.0
    assert result.verdict(True) == result.verdict(False) == "no difference shown"
    assert result.p_value == pytest.approx(1.0)


def test_lower_is_better_reads_a_negative_difference_as_better():
    result = paired({0: 0.9, 1: 1.1, 2: 1.0}, {0: 2.0, 1: 2.1, 2: 2.05})
    assert result.ci[1] < 0 and result.verdict(higher_is_better=False) == "better"
    assert result.cell(higher_is_better=False).endswith(": better")


def test_pairs_with_a_nan_are_left_out():
    result = paired({0: 1.0, 1: float("nan"), 2: 3.0, 3: None},
                    {0: 0.0, 1: 1.0, 2: 1.0, 3: 2.0})
    assert result.n == 2 and result.difference == 1.5  # d = 1, 2


def test_one_pair_has_a_difference_but_no_interval():
    result = paired({5: 1.0}, {5: 0.25})
    assert (result.n, result.difference, result.se, result.ci) == (1, 0.75, None, None)
    assert result.verdict(True) == "-" and result.cell(True) == "+0.7500 (n = 1)"
    empty = paired({5: float("nan")}, {5: 0.25})
    assert empty.n == 0 and empty.cell(True) == "-" and empty.verdict(True) == "-"


def test_unpaired_inputs_are_refused_naming_the_seeds():
    with pytest.raises(UnpairedError, match=r"seeds \[2\] only in the method, \[3\] only in "
                                            r"the baseline"):
        paired({0: 1.0, 1: 1.0, 2: 1.0}, {0: 1.0, 1: 1.0, 3: 1.0})
    with pytest.raises(UnpairedError, match="none only in the method"):
        paired({0: 1.0}, {0: 1.0, 1: 2.0})
    assert issubclass(UnpairedError, deconflict.DeconflictError)
    assert issubclass(UnpairedError, ValueError)


@pytest.mark.parametrize(("keywords", "message"), [
    ({"resamples": 0}, "resamples must be at least 1"),
    ({"level": 1.0}, r"level must be in \(0, 1\)"),
    ({"level": 0.0}, r"level must be in \(0, 1\)"),
])
def test_bad_settings_are_refused(keywords, message):
    with pytest.raises(ValueError, match=message):
        paired({0: 1.0, 1: 2.0}, {0: 0.0, 1: 0.0}, **keywords)


def test_the_level_sets_the_interval_width():
    d = dict(enumerate(np.random.default_rng(5).normal(size=30)))
    zero = dict.fromkeys(d, 0.0)
    wide, narrow = paired(d, zero, level=0.99), paired(d, zero, level=0.5)
    assert wide.ci[0] < narrow.ci[0] < narrow.ci[1] < wide.ci[1]
    assert isinstance(wide, Paired) and wide.level == 0.99
