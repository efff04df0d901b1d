"""Statistics of replicates against numbers worked out by hand for a small fixed table.

a = [2.0, 2.2, 2.4]: mean 2.2, sd 0.2, sem 0.2/sqrt(3); t(0.975, df 2) = 4.302653 (a t
table), so the 95% interval is 2.2 ± 0.496828.
b = [2.5, 2.6, 2.7, 2.8]: mean 2.65, sd sqrt(0.05/3).
Welch: se^2 = 0.04/3 + (0.05/3)/4 = 0.0175, t = -0.45/sqrt(0.0175) = -3.401680,
df = 0.0175^2 / ((0.04/3)^2/2 + (0.05/12)^2/3) = 3.234719, two-sided p from the t
distribution's CDF written as a regularised incomplete beta: I_{df/(df+t^2)}(df/2, 1/2)
= 0.037815; t(0.975, 3.234719) = 3.055713, so the interval is -0.45 ± 0.404238.
"""

from __future__ import annotations

import pytest

from lmlab.runs.stats import difference, summarize

A, B = [2.0, 2.2, 2.4], [2.5, 2.6, 2.7, 2.8]


def test_summary_matches_hand_numbers():
    s = summarize(A)
    assert s["n"] == 3 and s["mean"] == pytest.approx(2.2)
    assert s["sd"] == pytest.approx(0.2)
    assert s["ci"] == pytest.approx([2.2 - 0.496828, 2.2 + 0.496828], abs=1e-5)
    assert summarize(B)["sd"] == pytest.approx((0.05 / 3) ** 0.5)


def test_welch_difference_matches_hand_numbers():
    d = difference(A, B)
    assert d["diff"] == pytest.approx(-0.45)
    assert d["p"] == pytest.approx(0.037815, abs=1e-5)
    assert d["ci"] == pytest.approx([-0.45 - 0.404238, -0.45 + 0.404238], abs=1e-5)
    lo, hi = d["bootstrap_ci"]
    # resampled means stay within the extremes: min(a) - max(b) .. max(a) - min(b)
    assert -0.8 <= lo < -0.45 < hi <= -0.1
    assert d["verdict"] == "lower by 0.450 ± 0.404 nats, p = 0.038 (n = 3 vs 4)"


def test_no_detectable_difference_says_so_with_n():
    d = difference([2.0, 2.2, 2.4], [2.1, 2.2, 2.35])
    assert d["p"] > 0.05
    assert d["verdict"].startswith("no detectable difference at n = 3 (")


def test_fewer_than_two_seeds_get_no_interval_and_say_why():
    s = summarize([2.0])
    assert s["ci"] is None and s["sd"] is None and "n = 1" in s["note"]
    d = difference([2.0], B)
    assert d["p"] is None and d["ci"] is None and "n = 1 vs 4" in d["verdict"]
    assert "at least 2 seeds" in d["verdict"]


def test_identical_replicates_do_not_divide_by_zero():
    d = difference([2.0, 2.0], [2.5, 2.5])
    assert d["diff"] == pytest.approx(-0.5) and d["p"] == 0.0
    assert summarize([2.0, 2.0])["ci"] == [2.0, 2.0]


def test_holm_adjusts_k_comparisons_and_the_verdicts_follow_the_adjusted_p():
    from lmlab.runs.stats import adjust

    base = [2.3, 2.35, 2.4]
    ds = [difference([2.0, 2.1, 2.05], base), difference([2.3, 2.2, 2.35], base),
          difference([2.25, 2.2, 2.28], base), difference([2.0], base)]
    raw = [d["p"] for d in ds[:3]]
    adjust(ds)
    # Holm by hand: sort the p-values, multiply the i-th smallest by (k - i), keep it monotone
    order = sorted(range(3), key=lambda i: raw[i])
    expected, running = [0.0] * 3, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (3 - rank) * raw[i]))
        expected[i] = running
    assert [d["p_adjusted"] for d in ds[:3]] == pytest.approx(expected)
    assert all(d["p_method"] == "holm" for d in ds[:3]) and "p_adjusted" not in ds[3]
    # raw p 0.048 passes alone, but not once it is one of three tests
    assert raw[2] < 0.05 < ds[2]["p_adjusted"]
    assert ds[2]["verdict"].startswith("no detectable difference at n = 3 (-0.107 nats, 95% CI")
    assert "p = 0.048, Holm-adjusted p = 0.095 of k = 3" in ds[2]["verdict"]
    assert ds[0]["verdict"] == ("lower by 0.300 ± 0.113 nats, p = 0.002, Holm-adjusted "
                                "p = 0.005 of k = 3 (n = 3)")
