"""McNemar's test on known tables, and comparing two sources' answers."""

import math

import pytest

from stillroom.evaluate.compare import compare_predictions, mcnemar


def test_mcnemar_chi_square_with_continuity_correction_on_a_known_table():
    # 2x2 table: both right 101, only A right 121, only B right 59, both wrong 33.
    r = mcnemar(121, 59)
    assert r["method"] == "chi-square, continuity corrected"
    assert r["statistic"] == pytest.approx((abs(121 - 59) - 1) ** 2 / 180) == pytest.approx(20.6722, abs=1e-4)
    assert r["p_value"] == pytest.approx(5.4501e-06, rel=1e-3)  # scipy.stats.chi2.sf(20.6722, 1)


def test_mcnemar_exact_binomial_for_few_discordant_pairs():
    r = mcnemar(1, 5)
    assert r["method"] == "exact binomial"
    assert r["p_value"] == pytest.approx(2 * (1 + 6) / 64)  # 2 * P(X <= 1), X ~ Bin(6, 1/2) = 0.21875
    assert mcnemar(3, 17)["p_value"] == pytest.approx(0.0025768280029296875)  # scipy binomtest(3, 20)
    assert mcnemar(5, 5)["p_value"] == 1.0
    assert mcnemar(0, 0) == {"b": 0, "c": 0, "n_discordant": 0, "method": "none", "statistic": None, "p_value": 1.0}
    # the switch: 24 discordant pairs exact, 25 chi-square
    assert mcnemar(12, 12)["method"] == "exact binomial" and mcnemar(12, 13)["method"].startswith("chi-square")


def test_compare_predictions_counts_the_discordant_pairs():
    ref = {i: "x" for i in range(10)}
    a = {i: "x" if i < 8 else "y" for i in range(10)}  # right on 0-7
    b = {i: "x" if i in (0, 1, 2, 8) else "y" for i in range(10)}  # right on 0-2 and 8
    r = compare_predictions(a, b, ref, names=("fp32", "q8"), n_resamples=500)
    assert r["table"] == {"both_right": 3, "a_only": 5, "b_only": 1, "both_wrong": 1}
    assert r["test"]["p_value"] == pytest.approx(mcnemar(5, 1)["p_value"])
    assert r["a_score"] == 0.8 and r["b_score"] == 0.4
    assert r["difference"]["estimate"] == pytest.approx(40.0)  # a minus b, in points


def test_compare_uses_common_examples_and_refuses_nothing_in_common():
    ref = {1: "x", 2: "x", 3: "x"}
    r = compare_predictions({1: "x", 2: "y"}, {1: "x", 2: "x", 3: "x"}, ref, names=("a", "b"), n_resamples=100)
    assert r["n"] == 2 and r["missing"] == {"a": 1, "b": 0}
    with pytest.raises(Exception, match="none of the same"):
        compare_predictions({1: "x"}, {2: "x"}, ref, names=("a", "b"))


def test_non_binary_scores_use_a_paired_bootstrap():
    ref = {i: i for i in range(40)}
    score = lambda p, r: p  # noqa: E731  -- a graded score in [0, 1], as ROUGE-L would give
    a = {i: 0.9 for i in range(40)}
    b = {i: 0.6 + 0.01 * (i % 5) for i in range(40)}
    r = compare_predictions(a, b, ref, score=score, n_resamples=500)
    assert r["test"]["method"] == "paired bootstrap" and "table" not in r
    assert r["test"]["p_value"] < 0.01 and r["difference"]["estimate"] == pytest.approx(28.0)
    assert math.isclose(compare_predictions(a, a, ref, score=score)["test"]["p_value"], 1.0)
