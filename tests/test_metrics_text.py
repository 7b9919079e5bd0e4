"""Extraction and generation metrics, checked against values computed by hand, and the scorecard,
slices, calibration and comparison for those task types."""

import pytest

from stillroom.config import GateConfig, TaskConfig
from stillroom.evaluate.compare import compare_predictions
from stillroom.evaluate.metrics import (
    example_agrees, example_score, extraction_metrics, generation_metrics, task_metrics,
)
from stillroom.evaluate.scorecard import Scored, scorecard
from stillroom.tasks import make_task

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "date": {"type": "string"},
                                            "amount": {"type": "number"}}, "required": ["name"]}


def extraction_task(metric=None):
    return make_task(TaskConfig(name="invoices", type="extraction", schema=SCHEMA, metric=metric))


def generation_task(metric=None, threshold=0.5):
    return make_task(TaskConfig(name="summaries", type="generation", metric=metric, agreement_threshold=threshold))


# ---- extraction -------------------------------------------------------------------------------

def test_extraction_field_metrics_by_hand():
    task = extraction_task()
    reference = ['{"amount":10,"date":"2024-01-02","name":"Ann"}', '{"name":"Bob"}', '{"amount":5,"name":"Cy"}']
    predicted = [
        '{"amount":10,"date":"2024-01-03","name":"ann"}',  # name right (case-folded), amount right, date wrong
        '{"date":"2024-05-05","name":"Bob"}',  # name right, one extra field
        'sorry, no JSON here',  # invalid: states nothing
    ]
    m = extraction_metrics(predicted, reference, parse=task.parse)
    # pairs: reference 3 + 1 + 2 = 6; predicted 3 + 2 + 0 = 5; matched 2 + 1 + 0 = 3
    assert m["pairs"] == {"matched": 3, "predicted": 5, "reference": 6}
    assert m["field_precision"] == pytest.approx(3 / 5)
    assert m["field_recall"] == pytest.approx(3 / 6)
    assert m["field_f1"] == pytest.approx(2 * 3 / (5 + 6))
    # per field: name 2 of 2 predicted right, 2 of 3 in the references; date 0 of 2 predicted, 0 of 1
    assert m["per_field"]["name"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8),
                                      "support": 3, "predicted": 2}
    assert m["per_field"]["date"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1, "predicted": 2}
    assert m["per_field"]["amount"]["precision"] == 1.0 and m["per_field"]["amount"]["recall"] == 0.5
    assert m["exact_match"] == 0.0  # no record is exactly right
    # the invalid prediction is counted, not dropped
    assert m["n"] == 3 and m["validity"] == pytest.approx(2 / 3) and m["n_invalid"] == 1

    # per-example scores: record field F1 = 2*2/(3+3), 2*1/(2+1); an unparseable answer scores 0, never agrees
    assert example_score(task, predicted[0], reference[0]) == pytest.approx(4 / 6)
    assert example_score(task, predicted[1], reference[1]) == pytest.approx(2 / 3)
    assert example_score(task, predicted[2], reference[2]) == 0.0
    assert not example_agrees(task, predicted[2], reference[2])
    assert example_agrees(task, '```json\n{"name": "ann", "amount": 10.0, "date": "2024-01-02"}\n```', reference[0])


def test_extraction_exact_match_and_schema_validity():
    task = extraction_task("exact_match")
    reference = ['{"name":"Ann"}', '{"name":"Bob"}']
    valid_but_wrong_type = '{"name":"Bob","amount":"ten"}'  # JSON, but amount must be a number
    m = task_metrics("extraction", ['{"name":"ANN"}', valid_but_wrong_type], reference, [], parse=task.parse)
    assert m["exact_match"] == 0.5 and m["validity"] == 0.5
    assert example_score(task, '{"name":"ANN"}', reference[0]) == 1.0
    assert example_score(task, valid_but_wrong_type, reference[1]) == 0.0


# ---- generation -------------------------------------------------------------------------------

def test_generation_metrics_by_hand():
    reference = ["the cat sat on a mat"]
    m = generation_metrics(["the cat sat on the mat"], reference)
    # ROUGE-L: LCS "the cat sat on mat" = 5 words of 6 and 6: P = R = F1 = 5/6
    assert m["rouge_l"] == pytest.approx(5 / 6)
    # BLEU: clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths, so no brevity penalty
    assert m["bleu"] == pytest.approx((5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
    # chrF (beta 2, char n-grams 1-6, spaces removed): "ab" vs "abc": orders 1 and 2 only;
    # mean P = (1 + 1)/2 = 1, mean R = (2/3 + 1/2)/2 = 7/12, F2 = 5 * 7/12 / (4 + 7/12) = 7/11
    assert generation_metrics(["ab"], ["abc"])["chrf"] == pytest.approx(7 / 11)
    same = generation_metrics(["a b c d e"], ["a b c d e"])
    assert same["rouge_l"] == pytest.approx(1.0) and same["bleu"] == pytest.approx(1.0)
    assert same["chrf"] == pytest.approx(1.0)


def test_generation_length_statistics_and_invalid_answers():
    task = generation_task()
    predicted = ["one", "one two", "one two three", ""]  # the empty answer is invalid
    reference = ["a b", "a b c d", "a b c d e f", "a b c d e f g h i j"]
    m = generation_metrics(predicted, reference, parse=task.parse)
    ln = m["length"]
    # words: predictions 1, 2, 3, 0; references 2, 4, 6, 10 (numpy linear percentiles)
    assert ln["prediction"] == {"mean": 1.5, "p50": 1.5, "p95": pytest.approx(2.85)}
    assert ln["reference"] == {"mean": 5.5, "p50": 5.0, "p95": pytest.approx(9.4)}
    assert ln["ratio"] == pytest.approx(1.5 / 5.5)
    assert ln["prediction_histogram"][0] == 4 and ln["reference_histogram"][:3] == [2, 1, 1]
    assert m["validity"] == 0.75 and m["n_invalid"] == 1
    assert example_score(task, "", "a b") == 0.0 and not example_agrees(task, "  ", "a b")


# ---- the scorecard and everything downstream ----------------------------------------------------

def test_extraction_scorecard_field_slices_and_calibration():
    task = extraction_task()
    rows = []
    for k in range(8):
        ref = '{"amount":5,"name":"A%d"}' % k if k < 4 else '{"name":"B%d"}' % k
        student = ref if k % 2 == 0 else '{"name":"X"}'  # every odd one names the wrong party
        rows.append(Scored(k, f"invoice {k}", ref, student, confidence=0.9 if k % 2 == 0 else 0.4,
                           human=ref if k < 2 else None))
    rows.append(Scored(8, "garbled", '{"name":"C"}', "not json", 0.2))
    card = scorecard(task, rows, GateConfig(bootstrap_resamples=200, slice_min_examples=2))
    assert card["task_type"] == "extraction" and card["metric"] == "field_f1"
    # per record field F1: 1 for the 4 even rows, 0 for rows 1, 3 (amount+name vs name: 0 of 2+1), 5, 7, 8
    assert card["agreement"] == pytest.approx(4 / 9)
    assert card["vs_teacher"]["validity"] == pytest.approx(8 / 9)
    assert card["gap"]["teacher"]["estimate"] == pytest.approx(100 * 5 / 9)
    tw = card["three_way"]
    assert tw["student_vs_teacher"]["score"] == card["agreement"] and "field_f1" in tw["student_vs_teacher"]
    assert tw["teacher_vs_human"]["n"] == 2 and tw["teacher_vs_human"]["score"] == 1.0
    assert card["vs_human"]["student_score"] == 0.5 and card["vs_human"]["student_accuracy"] is None
    slices = {(s["kind"], s["name"]): s for s in card["slices"]["teacher"]["slices"]}
    assert ("class", '{"name":"C"}') not in slices  # no class slices for records
    assert slices[("field", "amount")]["n"] == 4 and slices[("field", "name")]["n"] == 9
    assert slices[("field", "amount")]["gap_points"] == 50.0
    assert [e["name"] for e in card["slices"]["teacher"]["empty"]] == ["date"]  # a schema field never stated
    # calibration uses agrees: the confident answers are the right ones
    rel = {b["low"]: b for b in card["confidence_calibration"]["reliability"] if b["n"]}
    assert rel[0.9]["accuracy"] == 1.0 and rel[0.4]["accuracy"] == 0.0 and rel[0.2]["accuracy"] == 0.0


def test_generation_scorecard_and_bootstrap_comparison():
    task = generation_task(threshold=0.6)
    refs = ["the parcel arrived late and damaged", "refund the double charge please", "screen cracked on arrival"]
    rows = [Scored(0, "t0", refs[0], refs[0], 0.95), Scored(1, "t1", refs[1], "refund the charge", 0.7),
            Scored(2, "t2", refs[2], "", 0.1)]
    card = scorecard(task, rows, GateConfig(bootstrap_resamples=200))
    # ROUGE-L F1: 1; "refund the charge" vs 5 words: LCS 3, P = 1, R = 3/5, F1 = 0.75; empty answer 0
    assert card["agreement"] == pytest.approx((1 + 0.75 + 0) / 3)
    assert card["vs_teacher"]["rouge_l"] == pytest.approx(card["agreement"])
    assert card["vs_teacher"]["validity"] == pytest.approx(2 / 3)
    assert not any(s["kind"] == "class" for s in card["slices"]["teacher"]["slices"])
    assert set(card["three_way"]["student_vs_teacher"]) == {"n", "score", "rouge_l", "bleu", "chrf", "validity"}
    # agreement threshold 0.6: rows 0 and 1 agree
    bins = [b for b in card["confidence_calibration"]["reliability"] if b["n"]]
    assert sum(b["accuracy"] * b["n"] for b in bins) == 2

    a = {0: refs[0], 1: "refund the charge", 2: ""}
    b = {0: refs[0], 1: refs[1], 2: refs[2]}
    result = compare_predictions(a, b, dict(enumerate(refs)), score=lambda p, r: example_score(task, p, r),
                                 n_resamples=300, test="bootstrap")
    assert result["test"]["method"] == "paired bootstrap" and "table" not in result
    assert result["a_score"] == pytest.approx(1.75 / 3) and result["b_score"] == pytest.approx(1.0)
