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
