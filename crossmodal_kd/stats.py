"""Statistics for benchmark tables: mean with a t confidence interval, paired comparisons, and Holm's
adjustment of the p-values of the many comparisons one table makes."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

from scipy import stats as sps


@dataclass(frozen=True)
class Estimate:
    """``n`` values: mean, sample std, and the half-width of the two-sided t interval (0 when n < 2)."""

    n: int
    mean: float
    std: float
    half_width: float

    @property
    def constant(self) -> bool:
        """Every value the same, up to float rounding (e.g. 0.8755 - 0.6245 and 0.8850 - 0.6340)."""
        return self.n > 1 and self.std <= 1e-9 * max(1.0, abs(self.mean))

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def estimate(values: Sequence[float], level: float = 0.95) -> Estimate:
    n = len(values)
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan)
    mean = statistics.fmean(values)
    if n < 2:
        return Estimate(1, mean, 0.0, 0.0)
    std = statistics.stdev(values)
    return Estimate(n, mean, std, sps.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n))


@dataclass(frozen=True)
class Paired:
    """``a - b`` over matched pairs: its estimate and the two-sided paired t-test p-value (the exact sign-flip
    test's where every pair differs by the same amount, see :func:`paired`)."""

    diff: Estimate
    p_value: float
    level: float = 0.95

    @property
    def separated(self) -> bool:
        """True when the confidence interval of the mean difference excludes 0 (outside the noise). A zero-width
        interval (identical differences) counts only where the exact test also rejects at the same level."""
        if self.diff.n < 2 or not (self.diff.low > 0 or self.diff.high < 0):
            return False
        return not self.diff.constant or self.p_value < 1 - self.level


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Paired:
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs matched pairs, got {len(a)} and {len(b)} values")
    diffs = [x - y for x, y in zip(a, b)]
    est = estimate(diffs, level)
    if est.n < 2:
        return Paired(est, math.nan, level)
    if est.constant:
        # Every pair differs by the same amount (test accuracies are discrete, so at a few seeds this happens by
        # chance): the t statistic is undefined, not infinite. The exact sign-flip (permutation) test gives
        # 2^(1 - n), the smallest p-value n pairs can give (0.5 at n = 2); 1 when every difference is 0.
        return Paired(est, 1.0 if est.mean == 0 else min(1.0, 2.0 ** (1 - est.n)), level)
    return Paired(est, float(sps.ttest_rel(a, b).pvalue), level)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm, Scand. J. Statist. 1979), in the input order: with m tests
    sorted by p, the i-th smallest becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``. NaN entries (no test)
    stay NaN and do not count in m. Calling a difference real only where the adjusted value is below alpha
    keeps the chance of any false "outside the noise" among the m at most alpha."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p == p)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted
