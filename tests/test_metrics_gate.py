import pytest

from stillroom.config import GateConfig
from stillroom.evaluate.gate import decide
from stillroom.evaluate.metrics import classification_metrics
from stillroom.route.calibrate import apply_threshold, pick_threshold


def test_metrics_match_hand_computed_values():
    labels = ["a", "b", "c"]
    ref = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    m = classification_metrics(pred, ref, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    # a: P=2/2 R=2/3 ; b: P=1/2 R=1/2 ; c: P=1/2 R=1/1
    assert m["per_class"]["a"]["precision"] == 1.0 and m["per_class"]["a"]["recall"] == pytest.approx(2 / 3)
    f1 = {"a": 0.8, "b": 0.5, "c": 2 / 3}
    for k, v in f1.items():
        assert m["per_class"][k]["f1"] == pytest.approx(v)
    assert m["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert m["per_class"]["a"]["support"] == 3


def test_metrics_refuse_unknown_labels_and_length_mismatch():
    with pytest.raises(ValueError, match="outside the task's label set: z"):
        classification_metrics(["z"], ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="2 predictions but 1"):
        classification_metrics(["a", "a"], ["a"], ["a", "b"])


def test_threshold_is_lowest_that_meets_target():
    conf = [0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    ok = [True, True, True, True, False, True, False, False]
    # covered agreement by cut: 1,1,1,1,.8,.833,.714,.625
    assert pick_threshold(conf, ok, 1.0)["threshold"] == 0.8
    chosen = pick_threshold(conf, ok, 0.8)
    assert chosen["threshold"] == 0.6 and chosen["coverage"] == 6 / 8 and chosen["agreement"] == pytest.approx(5 / 6)
    none = pick_threshold([0.9, 0.8], [False, False], 0.9)
    assert none["threshold"] > 1 and none["coverage"] == 0


def test_ties_are_served_together():
    assert pick_threshold([0.9, 0.9, 0.5], [True, False, True], 1.0)["coverage"] == 0


def test_apply_threshold_reports_student_and_system_agreement():
    r = apply_threshold([0.9, 0.8, 0.3, 0.2], [True, False, False, True], 0.5)
    assert r["coverage"] == 0.5 and r["student_agreement_on_covered"] == 0.5 and r["system_agreement"] == 0.75


def _evaluation(agreement, human_n=0, student_h=None, teacher_h=None, stale=False):
    return {"student": "s", "agreement": agreement, "vs_teacher": {"n": 200},
            "vs_human": {"n": human_n, "student_accuracy": student_h, "teacher_accuracy": teacher_h},
            "stale": stale}


def test_gate_against_teacher_when_few_human_labels():
    v = decide(_evaluation(0.975, human_n=5, student_h=1.0, teacher_h=0.8), GateConfig())
    assert v.passed and v.reference == "teacher" and v.gap_points == 2.5
    v = decide(_evaluation(0.96), GateConfig(preset="high_stakes"))
    assert not v.passed and v.allowed_points == 1.0 and "3.00 over the allowed 1" in v.message


def test_gate_against_humans_counts_teacher_mistakes():
    v = decide(_evaluation(0.80, human_n=100, student_h=0.85, teacher_h=0.83), GateConfig())
    assert v.passed and v.reference == "human" and v.gap_points == -2.0
    v = decide(_evaluation(0.99, human_n=100, student_h=0.70, teacher_h=0.90), GateConfig(max_gap_points=2))
    assert not v.passed and v.gap_points == 20.0 and "18.00 over" in v.message


def test_stale_evaluation_fails_and_human_reference_needs_humans():
    assert not decide(_evaluation(1.0, stale=True), GateConfig()).passed
    with pytest.raises(ValueError, match="no human labels"):
        decide(_evaluation(1.0), GateConfig(reference="human"))


# ---- micro-F1, calibration ---------------------------------------------------------------------

from stillroom.evaluate.metrics import expected_calibration_error, reliability_curve  # noqa: E402


def test_micro_f1_pools_counts_and_equals_accuracy_for_single_label():
    labels = ["a", "b", "c"]
    ref = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    m = classification_metrics(pred, ref, labels)
    # TP = 2 + 1 + 1 = 4; FP = 0 + 1 + 1 = 2; FN = 1 + 1 + 0 = 2 -> 2*4 / (2*4 + 2 + 2) = 8/12
    assert m["micro_f1"] == pytest.approx(8 / 12)
    assert m["micro_f1"] == pytest.approx(m["accuracy"])
    assert classification_metrics([], [], labels)["micro_f1"] is None


def test_reliability_curve_and_ece_by_hand():
    conf = [0.05, 0.15, 0.95, 0.91, 1.0, 0.55, 0.55]
    ok = [False, True, True, True, False, True, False]
    curve = reliability_curve(conf, ok, bins=10)
    assert [b["n"] for b in curve] == [1, 1, 0, 0, 0, 2, 0, 0, 0, 3]  # 1.0 joins the top bin
    assert curve[2]["accuracy"] is None and curve[2]["mean_confidence"] is None  # empty: not a zero
    top = curve[9]
    assert top["mean_confidence"] == pytest.approx((0.95 + 0.91 + 1.0) / 3) and top["accuracy"] == pytest.approx(2 / 3)
    # ECE = 1/7*|0-.05| + 1/7*|1-.15| + 2/7*|.5-.55| + 3/7*|2/3 - 2.86/3|
    expected = (0.05 + 0.85 + 2 * 0.05 + 3 * abs(2 / 3 - 2.86 / 3)) / 7
    assert expected_calibration_error(conf, ok, bins=10) == pytest.approx(expected)
    assert expected_calibration_error([], []) is None
    assert expected_calibration_error([0.8] * 5, [True] * 4 + [False]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability_curve([1.2], [True])


# ---- paired bootstrap --------------------------------------------------------------------------

import numpy as np  # noqa: E402

from stillroom.evaluate.bootstrap import mean_ci, paired_gap_ci  # noqa: E402


def test_paired_gap_is_seeded_and_in_points():
    teacher = [1, 1, 1, 0, 1, 1, 1, 1, 0, 1]
    student = [1, 0, 1, 0, 1, 1, 0, 1, 1, 1]
    a = paired_gap_ci(teacher, student, n_resamples=500, seed=3)
    assert a == paired_gap_ci(teacher, student, n_resamples=500, seed=3)
    assert a["estimate"] == pytest.approx(10.0)  # 80% - 70%
    assert a["teacher"] == 0.8 and a["student"] == 0.7 and a["n"] == 10
    assert a["low"] <= a["estimate"] <= a["high"]
    same = paired_gap_ci([1] * 5, [1] * 5, n_resamples=100)
    assert same["low"] == same["high"] == 0.0
    assert mean_ci([])["estimate"] is None
    with pytest.raises(ValueError, match="3 teacher scores but 2"):
        paired_gap_ci([1, 1, 1], [1, 1])


def _coverage(probs: list[float], n: int, sims: int, true_gap: float, seed: int) -> float:
    """Share of simulated eval sets whose 95% interval contains the true gap. `probs` are the
    probabilities of (teacher right, student right) = (1,1), (1,0), (0,1), (0,0)."""
    rng = np.random.default_rng(seed)
    outcomes = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    hits = 0
    for k in range(sims):
        pairs = outcomes[rng.choice(4, size=n, p=probs)]
        ci = paired_gap_ci(pairs[:, 0], pairs[:, 1], n_resamples=1000, seed=k)
        hits += ci["low"] <= true_gap <= ci["high"]
    return hits / sims


def test_bootstrap_interval_covers_the_true_gap_about_95_percent_of_the_time():
    # Against the teacher: teacher always right, the student right 95% of the time: gap 5 points.
    assert 0.91 <= _coverage([0.95, 0.05, 0.0, 0.0], n=400, sims=300, true_gap=5.0, seed=1) <= 0.985
    # Against humans, correlated errors: teacher right 90%, student right 84%: gap 6 points.
    assert 0.91 <= _coverage([0.80, 0.10, 0.04, 0.06], n=400, sims=300, true_gap=6.0, seed=2) <= 0.985


def test_paired_interval_is_narrower_than_treating_the_scores_as_independent():
    rng = np.random.default_rng(0)
    hard = rng.random(500) < 0.2  # hard examples trip both
    teacher = (~hard | (rng.random(500) < 0.3)).astype(float)
    student = (~hard & (rng.random(500) < 0.97)).astype(float)
    paired = paired_gap_ci(teacher, student, n_resamples=2000, seed=0)
    t, s = mean_ci(teacher, 2000, seed=1), mean_ci(student, 2000, seed=2)
    independent_width = 100 * ((t["high"] - t["low"]) ** 2 + (s["high"] - s["low"]) ** 2) ** 0.5
    assert paired["high"] - paired["low"] < independent_width


# ---- gate: modes and the slice rule ------------------------------------------------------------


def _full(agreement=0.98, low=0.5, high=4.0, slices=(), n=400, stale=False, lock_status=None):
    return {"student": "s", "agreement": agreement, "vs_teacher": {"n": n},
            "vs_human": {"n": 0, "student_accuracy": None, "teacher_accuracy": None},
            "gap": {"teacher": {"estimate": (1 - agreement) * 100, "low": low, "high": high, "confidence": 0.95},
                    "human": None},
            "slices": {"teacher": {"slices": list(slices)}, "human": None},
            "stale": stale, "lock_status": lock_status}


def _slice(name, n, gap, kind="class"):
    return {"kind": kind, "name": name, "n": n, "gap_points": gap}


def test_point_mode_uses_the_estimate_and_states_the_interval():
    v = decide(_full(agreement=0.98, low=0.5, high=4.0), GateConfig())
    assert v.passed and v.mode == "point" and v.gap_points == 2.0 and v.compared_points == 2.0
    assert (v.ci_low, v.ci_high) == (0.5, 4.0)
    assert v.message.startswith("PASS") and "(point mode)" in v.message and "95% CI 0.50 to 4.00" in v.message


def test_strict_mode_uses_the_upper_bound():
    cfg = GateConfig(mode="strict")
    v = decide(_full(agreement=0.98, low=0.5, high=4.0), cfg)
    assert not v.passed and v.mode == "strict" and v.compared_points == 4.0
    assert "upper 95% bound" in v.message and "1.00 over the allowed 3" in v.message and "(strict mode)" in v.message
    assert decide(_full(agreement=0.99, low=0.0, high=2.9), cfg).passed
    # the CLI's --mode overrides the configured mode
    assert decide(_full(agreement=0.98, low=0.5, high=4.0), cfg, mode="point").passed
    with pytest.raises(ValueError, match="re-run `stillroom eval s`"):
        decide(_evaluation(0.99), cfg)  # an evaluation without an interval cannot be judged strictly


def test_slice_rule_fails_a_passing_student_and_names_the_slice():
    slices = [_slice("refund", 25, 7.5), _slice("11-20 words", 19, 30.0, "length"), _slice("billing", 40, 5.9)]
    v = decide(_full(agreement=0.98, slices=slices), GateConfig())  # limit: 2 x 3 = 6 points, from 20 examples
    assert not v.passed and v.gap_points == 2.0
    assert v.failing_slices == [{"kind": "class", "name": "refund", "n": 25, "gap_points": 7.5}]
    assert "slice class='refund' (25 examples) is 7.50 points behind" in v.message and "(slice rule)" in v.message
    assert v.slice_rule == {"min_examples": 20, "multiple": 2.0, "threshold_points": 6.0}
    # the 19-example slice is below slice_min_examples until the threshold is lowered
    v = decide(_full(agreement=0.98, slices=slices), GateConfig(slice_min_examples=10))
    assert [s["name"] for s in v.failing_slices] == ["11-20 words", "refund"]
    assert "and 1 more slice(s)" in v.message
    assert decide(_full(agreement=0.98, slices=slices), GateConfig(slice_gap_multiple=3)).passed


def test_stale_verdict_says_why():
    status = {"message": 'ran against eval lock 1; the eval set was re-locked since as lock 2 (2025-01-01 10:00, '
                         'reason: "added reviewed examples"); re-run `stillroom eval`'}
    v = decide(_full(stale=True, lock_status=status), GateConfig())
    assert not v.passed and v.stale and "added reviewed examples" in v.message and v.stale_reason == status["message"]


def test_scorecard_names_labels_the_task_does_not_list(make_project):
    from stillroom.evaluate.scorecard import LabelSetError, Scored, scorecard

    project = make_project()
    rows = [Scored(1, "a parcel", "shipping", "shipping", 0.9), Scored(2, "a refund", "refunds", "billing", 0.8)]
    with pytest.raises(LabelSetError, match="the teacher's labels include refunds"):
        scorecard(project.task, rows, GateConfig())
    rows[1].teacher = "billing"
    rows[1].human = "Billing"
    with pytest.raises(LabelSetError, match="the human's labels include Billing"):
        scorecard(project.task, rows, GateConfig())
    rows[1].human = None
    card = scorecard(project.task, rows, GateConfig(bootstrap_resamples=100))
    assert card["agreement"] == 1.0 and card["vs_human"]["n"] == 0
    assert card["three_way"]["teacher_vs_human"] == {"n": 0, "score": None, "accuracy": None, "macro_f1": None,
                                                     "micro_f1": None}
    assert "no human labels" in card["three_way"]["message"] and card["gap"]["human"] is None
    empty = [e["name"] for e in card["slices"]["teacher"]["empty"]]
    assert empty == ["other"]  # a class with no examples is named, not scored as zero
