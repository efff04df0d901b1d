"""Statistics of replicates: mean, sd and a t interval per group; a difference with a p-value.

Seeds are replicates, so a variant's figure is a sample, not a number: the
report gives its 95% t interval, and a difference against the baseline gets
Welch's t-test (no equal-variance assumption) and a bootstrap interval of the
difference of means, all from scipy.stats. With fewer than two replicates on a
side there is no interval, and the verdict says why instead of guessing.

k variants against one baseline are k tests: by chance alone one of them will
pass at 5% far more often than 5% of the time. `adjust` applies Holm's
step-down correction (statsmodels' `multipletests`, method "holm"), which keeps
the chance of any false "different" at 5% whatever the tests' dependence, and
the verdicts are then read off the adjusted p-values.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LEVEL = 0.95


def summarize(values: list[float]) -> dict[str, Any]:
    """n, mean, sd (n-1) and the 95% t interval of the mean (None with a reason when n < 2)."""
    from scipy import stats  # imported when used: `lmlab` commands start faster without it

    x = np.asarray(values, dtype=float)
    n = len(x)
    out: dict[str, Any] = {"n": n, "mean": float(x.mean()) if n else None, "sd": None,
                           "ci": None, "note": None}
    if n < 2:
        out["note"] = f"no interval: n = {n} (an interval needs at least 2 seeds)"
        return out
    out["sd"] = float(x.std(ddof=1))
    sem = stats.sem(x)
    if sem == 0:
        out["ci"] = [out["mean"], out["mean"]]
    else:
        lo, hi = stats.t.interval(LEVEL, n - 1, loc=out["mean"], scale=sem)
        out["ci"] = [float(lo), float(hi)]
    return out


def difference(variant: list[float], baseline: list[float], unit: str = "nats",
               n_resamples: int = 9999, seed: int = 0) -> dict[str, Any]:
    """variant - baseline: the difference of means, Welch's t-test and a bootstrap interval."""
    from scipy import stats

    a, b = np.asarray(variant, dtype=float), np.asarray(baseline, dtype=float)
    out: dict[str, Any] = {"diff": float(a.mean() - b.mean()) if len(a) and len(b) else None,
                           "n": [len(a), len(b)], "p": None, "ci": None, "bootstrap_ci": None}
    if len(a) < 2 or len(b) < 2:
        out["verdict"] = (f"no test: n = {len(a)} vs {len(b)} (a test needs at least 2 seeds "
                          "on each side)")
        return out
    if a.std(ddof=1) == 0 and b.std(ddof=1) == 0:
        same = out["diff"] == 0
        out["p"] = 1.0 if same else 0.0
        out["ci"] = out["bootstrap_ci"] = [out["diff"], out["diff"]]
    else:
        test = stats.ttest_ind(a, b, equal_var=False)
        ci = test.confidence_interval(LEVEL)
        out["p"], out["ci"] = float(test.pvalue), [float(ci.low), float(ci.high)]
        boot = stats.bootstrap((a, b), lambda x, y, axis: x.mean(axis) - y.mean(axis),
                               n_resamples=n_resamples, confidence_level=LEVEL,
                               method="percentile", rng=np.random.default_rng(seed))
        out["bootstrap_ci"] = [float(boot.confidence_interval.low),
                               float(boot.confidence_interval.high)]
    out["verdict"] = verdict(out["diff"], out["ci"], out["p"], len(a), len(b), unit)
    return out


HOLM = "holm"


def adjust(diffs: list[dict[str, Any]], method: str = HOLM, unit: str = "nats") -> None:
    """Add `p_adjusted` and `p_method` to each difference, and base its verdict on them.

    The raw `p` stays; a difference without a test (too few seeds) takes no part.
    A single test is its own adjustment: its verdict is left as it was.
    """
    from statsmodels.stats.multitest import multipletests

    tested = [d for d in diffs if d.get("p") is not None and not math.isnan(d["p"])]
    if not tested:
        return
    adjusted = multipletests([d["p"] for d in tested], alpha=1 - LEVEL, method=method)[1]
    for d, p_adj in zip(tested, adjusted, strict=True):
        d["p_adjusted"], d["p_method"] = float(p_adj), method
        if len(tested) > 1:
            d["verdict"] = verdict(d["diff"], d["ci"], float(p_adj), *d["n"], unit,
                                   raw_p=d["p"], method=method, k=len(tested))


def verdict(diff: float, ci: list[float], p: float, n_a: int, n_b: int, unit: str,
            raw_p: float | None = None, method: str | None = None, k: int = 1) -> str:
    """A plain sentence: 'lower by 0.031 ± 0.012 nats, p = 0.002' or 'no detectable ...'.

    With `method`, `p` is the adjusted p-value of one of `k` tests and `raw_p`
    the test's own; both are named: '..., p = 0.004, Holm-adjusted p = 0.012 of k = 3'.
    """
    n = f"n = {n_a}" if n_a == n_b else f"n = {n_a} vs {n_b}"
    half = (ci[1] - ci[0]) / 2
    ps = _p(p) if method is None else (f"{_p(raw_p)}, {method.capitalize()}-adjusted "
                                       f"{_p(p)} of k = {k}")
    if p is None or math.isnan(p) or p >= 1 - LEVEL:
        return (f"no detectable difference at {n} ({diff:+.3f} {unit}, 95% CI "
                f"[{ci[0]:+.3f}, {ci[1]:+.3f}], {ps})")
    word = "lower" if diff < 0 else "higher"
    return f"{word} by {abs(diff):.3f} ± {half:.3f} {unit}, {ps} ({n})"


def _p(p: float | None) -> str:
    if p is None or math.isnan(p):
        return "p = n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
