"""The gate: is the student within the allowed gap to the teacher on the locked eval set?

Two modes (`gate.mode`): `point` passes when the estimated gap is within the allowed gap; `strict`
when the upper end of its paired bootstrap 95% interval is. In both modes a slice rule applies: any
slice with at least `slice_min_examples` examples whose gap exceeds `slice_gap_multiple` x the
allowed gap fails the gate, and the verdict names it. A stale evaluation (an older eval lock) fails.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from stillroom.config import GateConfig
from stillroom.errors import StillroomError

__all__ = ["GateError", "GateVerdict", "decide", "failing_slices"]


class GateError(StillroomError, ValueError):
    """No verdict is possible (e.g. a human reference without human labels); the message says why."""


@dataclass
class GateVerdict:
    student: str
    passed: bool
    reference: str  # human | teacher
    gap_points: float  # teacher quality minus student quality, in percentage points
    allowed_points: float
    student_score: float
    teacher_score: float
    n: int
    stale: bool
    message: str
    mode: str = "point"
    ci_low: float | None = None  # paired bootstrap interval of the gap, in points
    ci_high: float | None = None
    confidence: float | None = None
    compared_points: float | None = None  # what was held against the allowed gap (estimate or upper bound)
    slice_rule: dict = field(default_factory=dict)
    failing_slices: list[dict] = field(default_factory=list)
    stale_reason: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def failing_slices(slices: dict | None, gate: GateConfig) -> list[dict]:
    """Slices large enough to be gated whose gap exceeds the slice threshold, worst first."""
    if not slices:
        return []
    limit = gate.slice_gap_multiple * gate.allowed_gap_points
    bad = [s for s in slices["slices"] if s["n"] >= gate.slice_min_examples and s["gap_points"] > limit]
    bad.sort(key=lambda s: (-s["gap_points"], -s["n"]))
    return [{"kind": s["kind"], "name": s["name"], "n": s["n"], "gap_points": s["gap_points"]} for s in bad]


def _fresh_judge(evaluation: dict) -> dict | None:
    """The judge result attached to a generation evaluation, if it is current and scored anything."""
    judged = evaluation.get("judge")
    if not judged or judged.get("stale") or not (judged.get("win_rate") or {}).get("n"):
        return None
    return judged


def _ci_text(ci: dict | None) -> str:
    if not ci or ci.get("low") is None:
        return "no interval recorded"
    return f"{ci['confidence']:.0%} CI {ci['low']:.2f} to {ci['high']:.2f}"


def decide(evaluation: dict, gate: GateConfig, mode: str | None = None) -> GateVerdict:
    """Against human labels when the eval split has enough of them (the teacher's own mistakes then
    count against it too), otherwise against the teacher's labels (teacher = 100%). `mode`
    overrides `gate.mode`."""
    mode = mode or gate.mode
    if mode not in ("point", "strict"):
        raise GateError(f"gate mode must be 'point' or 'strict', got {mode!r}")
    human = evaluation["vs_human"]
    use_human = gate.reference == "human" or (
        gate.reference == "auto" and human["n"] >= gate.min_human_examples
    )
    if use_human and not human["n"]:
        raise GateError("gate.reference is 'human' but the eval split has no human labels; "
                        "import some with `stillroom import FILE --as human`")
    if use_human:
        # `student_score` is the task's metric (accuracy for classification); older records have accuracy only
        student = human.get("student_score", human.get("student_accuracy"))
        teacher = human.get("teacher_score", human.get("teacher_accuracy"))
        reference, n = "human", human["n"]
    else:
        reference, student, teacher, n = "teacher", evaluation["agreement"], 1.0, evaluation["vs_teacher"]["n"]
    name = evaluation["student"]
    ci = (evaluation.get("gap") or {}).get(reference)
    judged = _fresh_judge(evaluation) if reference == "teacher" else None
    if judged is not None:  # generation vs the teacher: the judge's at-or-above rate decides
        win = judged["win_rate"]
        student, n = win["estimate"], win["n"]
        ci = {"low": round((1 - win["high"]) * 100, 4), "high": round((1 - win["low"]) * 100, 4),
              "confidence": win["confidence"]}
    elif reference == "teacher" and (evaluation.get("gap") or {}).get("teacher", {}).get("basis") == "agree_rate":
        student = evaluation["agree_rate"]
    gap = round((teacher - student) * 100, 2)
    allowed = gate.allowed_gap_points
    has_ci = bool(ci) and ci.get("high") is not None
    if mode == "strict" and not has_ci:
        raise GateError(f"strict mode needs the gap's confidence interval, and the evaluation of '{name}' has "
                        f"none (it predates intervals); re-run `stillroom eval {name}`")
    compared = round(ci["high"], 2) if mode == "strict" else gap
    bad_slices = failing_slices((evaluation.get("slices") or {}).get(reference), gate)
    stale = bool(evaluation.get("stale"))
    stale_reason = (evaluation.get("lock_status") or {}).get("message") if stale else None
    passed = compared <= allowed and not bad_slices and not stale

    metric = evaluation.get("metric") or "accuracy"
    measure = "" if metric == "accuracy" else f" ({metric})"
    if reference == "human":
        basis = f"on {n} human-labelled eval examples{measure}: teacher {teacher:.1%}, student {student:.1%}"
    elif judged is not None:
        basis = (f"the judge rated the student at or above the teacher on {student:.1%} of {n} eval examples "
                 f"(judge evaluation {judged.get('evaluation_id')})")
    elif "agree_rate" in evaluation and (evaluation.get("gap") or {}).get("teacher", {}).get("basis") == "agree_rate":
        basis = (f"{student:.1%} of {n} eval answers agree with the teacher's ({metric} >= "
                 f"{evaluation.get('agreement_threshold', 'the threshold')}; mean {metric} "
                 f"{evaluation['agreement']:.3f}); run `stillroom judge {name}` to gate on a judge instead")
    else:
        basis = f"agreement with the teacher on {n} eval examples{measure}: {student:.1%}"
    ci_part = _ci_text(ci) if has_ci else "no interval recorded"
    if mode == "strict":
        overall = (f"the gap of '{name}' to the teacher has an upper {ci['confidence']:.0%} bound of "
                   f"{compared:.2f} points (estimate {gap:.2f}, {ci_part})")
    else:
        overall = f"'{name}' is {gap:.2f} points behind the teacher ({ci_part})"
    rule = f"({mode} mode)"
    if stale:
        message = (f"FAIL: the evaluation of '{name}' is stale: it "
                   + (stale_reason or "ran against an older eval lock; re-run `stillroom eval`"))
    elif compared > allowed:
        message = f"FAIL: {overall}, {compared - allowed:.2f} over the allowed {allowed:g} {rule}; {basis}"
    elif bad_slices:
        worst = bad_slices[0]
        more = f" and {len(bad_slices) - 1} more slice(s)" if len(bad_slices) > 1 else ""
        message = (f"FAIL: slice {worst['kind']}={worst['name']!r} ({worst['n']} examples) is "
                   f"{worst['gap_points']:.2f} points behind, above {gate.slice_gap_multiple:g} x the allowed "
                   f"{allowed:g} = {gate.slice_gap_multiple * allowed:g}{more} (slice rule); overall {overall} "
                   f"{rule}; {basis}")
    else:
        within = "within" if mode == "point" else "upper bound within"
        message = f"PASS: {overall}, {within} the allowed {allowed:g} {rule}; {basis}"
    return GateVerdict(
        name, passed, reference, gap, allowed, student, teacher, n, stale, message,
        mode=mode, ci_low=ci["low"] if has_ci else None, ci_high=ci["high"] if has_ci else None,
        confidence=ci["confidence"] if has_ci else None, compared_points=compared,
        slice_rule={"min_examples": gate.slice_min_examples, "multiple": gate.slice_gap_multiple,
                    "threshold_points": round(gate.slice_gap_multiple * allowed, 4)},
        failing_slices=bad_slices, stale_reason=stale_reason,
    )
