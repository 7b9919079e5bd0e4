"""Pick the confidence threshold that meets a target agreement with the teacher."""

from __future__ import annotations


def pick_threshold(confidences: list[float], agrees: list[bool], target: float) -> dict:
    """The lowest threshold t whose covered set (confidence >= t) agrees with the teacher at least
    `target` of the time; the lowest such t maximises coverage. With no such t the student serves
    nothing (threshold above 1)."""
    if len(confidences) != len(agrees):
        raise ValueError("confidences and agreement flags differ in length")
    n = len(confidences)
    pairs = sorted(zip(confidences, agrees), key=lambda p: -p[0])
    best = {"threshold": 1.01, "coverage": 0.0, "agreement": None, "n": n, "target": target}
    hits = 0
    for k, (conf, ok) in enumerate(pairs, start=1):
        hits += ok
        # Only cut between distinct confidences: ties are served together or not at all.
        if k < n and pairs[k][0] == conf:
            continue
        if hits / k >= target:
            best = {"threshold": conf, "coverage": k / n, "agreement": hits / k, "n": n, "target": target}
    return best


def apply_threshold(confidences: list[float], agrees: list[bool], threshold: float) -> dict:
    """Coverage and agreement of the student's answers at a threshold, and of the routed system
    (student where covered, teacher elsewhere, the teacher agreeing with itself)."""
    n = len(confidences)
    covered = [ok for conf, ok in zip(confidences, agrees) if conf >= threshold]
    return {
        "threshold": threshold,
        "n": n,
        "coverage": len(covered) / n if n else 0.0,
        "student_agreement_on_covered": sum(covered) / len(covered) if covered else None,
        "system_agreement": (sum(covered) + (n - len(covered))) / n if n else None,
    }


def coverage_curve(confidences: list[float], agrees: list[bool], points: int = 21) -> list[dict]:
    """Coverage and agreement at evenly spaced thresholds, for the report's plot."""
    return [apply_threshold(confidences, agrees, i / (points - 1)) for i in range(points)]
