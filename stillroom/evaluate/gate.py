"""The gate: is the student within the allowed gap to the teacher on the locked eval set?"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from stillroom.config import GateConfig


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

    def as_dict(self) -> dict:
        return asdict(self)


def decide(evaluation: dict, gate: GateConfig) -> GateVerdict:
    """Against human labels when the eval split has enough of them (the teacher's own mistakes then
    count against it too), otherwise against the teacher's labels (teacher = 100%)."""
    human = evaluation["vs_human"]
    use_human = gate.reference == "human" or (
        gate.reference == "auto" and human["n"] >= gate.min_human_examples
    )
    if use_human and not human["n"]:
        raise ValueError("gate.reference is 'human' but the eval split has no human labels; "
                         "import some with `stillroom import FILE --as human`")
    if use_human:
        reference, student, teacher, n = "human", human["student_accuracy"], human["teacher_accuracy"], human["n"]
    else:
        reference, student, teacher, n = "teacher", evaluation["agreement"], 1.0, evaluation["vs_teacher"]["n"]
    gap = round((teacher - student) * 100, 2)
    allowed = gate.allowed_gap_points
    passed = gap <= allowed and not evaluation.get("stale", False)
    basis = (f"on {n} human-labelled eval examples: teacher {teacher:.1%}, student {student:.1%}"
             if reference == "human" else f"agreement with the teacher on {n} eval examples: {student:.1%}")
    if evaluation.get("stale"):
        message = (f"FAIL: the evaluation of '{evaluation['student']}' ran against an older eval lock; "
                   "re-run `stillroom eval`")
    elif passed:
        message = f"PASS: '{evaluation['student']}' is {gap:.2f} points behind the teacher (allowed {allowed:g}); {basis}"
    else:
        message = (f"FAIL: '{evaluation['student']}' is {gap:.2f} points behind the teacher, "
                   f"{gap - allowed:.2f} over the allowed {allowed:g}; {basis}")
    return GateVerdict(evaluation["student"], passed, reference, gap, allowed, student, teacher, n,
                       bool(evaluation.get("stale")), message)
