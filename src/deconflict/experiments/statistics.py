"""Statistics over seeds for ``compare`` and ``sweep``: mean +- standard error, paired tests.

Pure NumPy and SciPy (no torch): the numbers of a report from the numbers of its runs.

Over the n finite values x_1..x_n of one metric (one per seed), ``summarize_values`` gives the
mean x_bar, the sample standard deviation s (ddof = 1) and the standard error of the mean
SE = s / sqrt(n). With n = 1 there is no SE (None, shown as "(n = 1)"): one seed says nothing
about the spread.

``paired`` compares a method with a baseline run on the same seeds. With d_k = x_k - b_k the
per-seed differences (k over the seeds both have a finite value):

- the mean difference d_bar and its standard error SE_d = s_d / sqrt(n);
- the paired t statistic t = d_bar / SE_d with n - 1 degrees of freedom and its two-sided
  p-value (Student's paired t-test, ``scipy.stats.ttest_rel``);
- a percentile bootstrap interval of d_bar: B resamples (10,000 by default) of the n
  differences with replacement, drawn by ``numpy.random.default_rng(seed)`` so a report is
  reproducible, and the (1 - level) / 2 and (1 + level) / 2 quantiles of their means.

Pairing is by seed: values are given as ``{seed: value}`` and a method and a baseline that were
not run on the same seeds are refused (``UnpairedError``) rather than silently compared as
independent samples. A seed whose value is NaN on either side (e.g. the epochs of a run that did
not converge) is left out of the pairs, and ``Paired.n`` says how many remain.

The p-values are not corrected for multiple comparisons: a table of M metrics times K methods
holds M K tests, so about 5% of them fall below 0.05 by chance when nothing differs.

>>> s = summarize_values([1.0, 2.0, 3.0])
>>> (s.n, s.mean, round(s.se, 4))
(3, 2.0, 0.5774)
>>> p = paired({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.5, 1: 1.0, 2: 3.0})
>>> (p.n, round(p.difference, 4), round(p.se, 4), round(p.t, 4), round(p.p_value, 4))
(3, 0.8333, 0.1667, 5.0, 0.0377)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..errors import DeconflictError

RESAMPLES = 10_000
LEVEL = 0.95
SEED = 0


class UnpairedError(DeconflictError, ValueError):
    """A paired comparison of values that were not measured on the same seeds."""


@dataclass(frozen=True)
class Summary:
    """n finite values: their mean, sample standard deviation and standard error.

    ``std`` and ``se`` are None when n < 2; ``mean`` is NaN when n = 0.

    >>> Summary.of([2.0, 4.0]).cell()
    '3.0000 +- 1.0000 (2)'
    >>> Summary.of([2.0]).cell()
    '2.0000 (n = 1)'
    """

    n: int
    mean: float
    std: float | None
    se: float | None

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Summary:
        """The summary of ``values`` (None and non-finite values are left out)."""
        return summarize_values(values)

    def cell(self, digits: int | None = None) -> str:
        """"mean +- SE (n)" for a table, "mean (n = 1)" for one value, "-" for none."""
        if self.n == 0 or not math.isfinite(self.mean):
            return "-"
        places = _digits(self.mean) if digits is None else digits
        if self.se is None:
            return f"{self.mean:.{places}f} (n = 1)"
        return f"{self.mean:.{places}f} +- {self.se:.{places}f} ({self.n})"


def _digits(value: float) -> int:
    # Four decimals for metrics of order one (AUCs, accuracies, losses), one for large ones
    # (epochs, degrees), as the tables printed before the standard errors did.
    return 4 if abs(value) < 100 else 1


def _finite(values: Iterable[float | None]) -> np.ndarray:
    array = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    return array[np.isfinite(array)]


def summarize_values(values: Iterable[float | None]) -> Summary:
    """Mean, standard deviation (ddof = 1) and standard error s / sqrt(n) of the finite values.

    >>> summarize_values([1.0, float("nan"), 3.0])
    Summary(n=2, mean=2.0, std=1.4142135623730951, se=1.0)
    """
    finite = _finite(values)
    n = int(finite.size)
    if n == 0:
        return Summary(0, math.nan, None, None)
    mean = float(finite.mean())
    if n == 1:
        return Summary(1, mean, None, None)
    std = float(finite.std(ddof=1))
    return Summary(n, mean, std, std / math.sqrt(n))


@dataclass(frozen=True)
class Paired:
    """A method minus a baseline over the same seeds (see the module docstring).

    ``difference`` is the mean of the per-seed differences, ``se`` its standard error, ``t``
    and ``p_value`` the paired t-test's, ``ci`` the percentile bootstrap interval at ``level``.
    With fewer than two pairs ``se``, ``t``, ``p_value`` and ``ci`` are None; when every
    difference is the same (a deterministic problem) ``se`` is 0, the interval is that single
    value and ``t`` and ``p_value`` are None (the t statistic is undefined).

    >>> p = paired({0: 0.70, 1: 0.72, 2: 0.71}, {0: 0.69, 1: 0.70, 2: 0.695})
    >>> p.cell(higher_is_better=True)
    '+0.0150 [+0.0100, +0.0200], p 0.035: better'
    >>> paired({0: 0.70, 1: 0.72}, {0: 0.69, 1: 0.70}).cell(higher_is_better=True)
    '+0.0150 [+0.0100, +0.0200], p 0.205: no difference shown'
    """

    n: int
    difference: float
    se: float | None
    t: float | None
    p_value: float | None
    ci: tuple[float, float] | None
    level: float = LEVEL

    def verdict(self, higher_is_better: bool) -> str:
        """"better" or "worse" (for the method, in the metric's direction) when the bootstrap
        interval excludes 0 and the t-test agrees (p < 1 - level; with identical differences,
        no p-value, the interval alone decides); else "no difference shown"; "-" without an
        interval (fewer than two pairs).

        Both are asked for because with a handful of seeds the percentile interval is too
        narrow (with two pairs it is just [d_1, d_2]), while the t-test accounts for n.
        """
        if self.ci is None:
            return "-"
        low, high = self.ci
        if low <= 0.0 <= high or (self.p_value is not None and self.p_value >= 1.0 - self.level):
            return "no difference shown"
        return "better" if (low > 0.0) == higher_is_better else "worse"

    def cell(self, higher_is_better: bool, digits: int | None = None) -> str:
        """The table cell: difference, interval, p-value and verdict."""
        if self.n == 0 or not math.isfinite(self.difference):
            return "-"
        scale = max([abs(self.difference), *(abs(v) for v in self.ci or ())])
        # Fixed decimals as the summaries, but differences below their last digit keep two
        # significant ones (a deterministic problem's 3e-05 is not "+0.0000"); one format
        # per cell.
        tiny = digits is None and 0.0 < scale < 1e-3

        def shown(value: float) -> str:
            if tiny:
                return f"{value:+.1e}"
            return f"{value:+.{_digits(scale) if digits is None else digits}f}"

        text = shown(self.difference)
        if self.ci is None:
            return text + " (n = 1)"
        text += f" [{shown(self.ci[0])}, {shown(self.ci[1])}]"
        text += ", p -" if self.p_value is None else f", p {_p(self.p_value)}"
        return f"{text}: {self.verdict(higher_is_better)}"


def _p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def paired(values: Mapping[int, float | None], baseline: Mapping[int, float | None], *,
           resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> Paired:
    """Paired comparison of ``values`` against ``baseline``, both keyed by seed.

    Different seed sets are an ``UnpairedError``; seeds with a non-finite value on either side
    are left out (``Paired.n`` counts the pairs kept).

    >>> paired({0: 1.0}, {1: 1.0})
    Traceback (most recent call last):
    ...
    deconflict.experiments.statistics.UnpairedError: a paired comparison needs the same seeds: ...
    """
    if set(values) != set(baseline):
        only = sorted(set(values) - set(baseline))
        missing = sorted(set(baseline) - set(values))
        raise UnpairedError(
            "a paired comparison needs the same seeds: seeds "
            f"{only or 'none'} only in the method, {missing or 'none'} only in the baseline")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    seeds = sorted(values)
    x = np.array([math.nan if values[k] is None else values[k] for k in seeds], dtype=np.float64)
    b = np.array([math.nan if baseline[k] is None else baseline[k] for k in seeds],
                 dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(b)
    x, b = x[keep], b[keep]
    d = x - b
    n = int(d.size)
    if n == 0:
        return Paired(0, math.nan, None, None, None, None, level)
    mean = float(d.mean())
    if n == 1:
        return Paired(1, mean, None, None, None, None, level)
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    interval = bootstrap_interval(d, resamples=resamples, level=level, seed=seed)
    if not np.any(d != d[0]):  # identical differences: no spread, t undefined
        return Paired(n, mean, 0.0, None, None, interval, level)
    test = stats.ttest_rel(x, b)
    return Paired(n, mean, se, float(test.statistic), float(test.pvalue), interval, level)


def bootstrap_interval(differences: np.ndarray, *, resamples: int = RESAMPLES,
                       level: float = LEVEL, seed: int = SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences``.

    ``resamples`` means of n values drawn with replacement (one (resamples, n) index draw, so
    it is vectorized), and their (1 - level) / 2 and (1 + level) / 2 quantiles.

    >>> bootstrap_interval(np.array([1.0, 1.0, 1.0]))
    (1.0, 1.0)
    """
    d = np.asarray(differences, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    low, high = np.quantile(means, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    # Every resampled mean lies within [min d, max d]; clip the quantile's rounding to it.
    return float(max(low, d.min())), float(min(high, d.max()))
