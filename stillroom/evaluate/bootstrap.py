"""Bootstrap confidence intervals, vectorised with numpy and seeded so a report can be reproduced.

The paired bootstrap resamples eval examples with replacement and recomputes teacher-minus-student
on the same resample, so the interval accounts for the two scores being measured on the same
inputs (their errors are correlated: a hard example tends to trip both). Intervals are percentile
intervals of the resampled statistic.
"""

from __future__ import annotations

import numpy as np

__all__ = ["paired_gap_ci", "mean_ci", "DEFAULT_RESAMPLES"]

DEFAULT_RESAMPLES = 2000
_CHUNK_CELLS = 4_000_000  # resample indices held in memory at once (~32 MB of int64)


def _resampled_means(values: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """The mean of `values` over `n_resamples` resamples with replacement (same length)."""
    n = len(values)
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples, dtype=float)
    chunk = max(1, _CHUNK_CELLS // max(n, 1))
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[idx].mean(axis=1)
    return out


def _check(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def mean_ci(values, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, confidence: float = 0.95) -> dict:
    """Mean of per-example values with a percentile bootstrap interval; None fields when empty."""
    _check(n_resamples, confidence)
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return {"estimate": None, "low": None, "high": None, "n": 0, "n_resamples": n_resamples,
                "seed": seed, "confidence": confidence}
    means = _resampled_means(values, n_resamples, seed)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return {"estimate": float(values.mean()), "low": float(low), "high": float(high), "n": int(values.size),
            "n_resamples": n_resamples, "seed": seed, "confidence": confidence}


def paired_gap_ci(teacher_scores, student_scores, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                  confidence: float = 0.95) -> dict:
    """Teacher-minus-student quality gap in percentage points, with a paired bootstrap interval.

    `teacher_scores[i]` and `student_scores[i]` score the same example i against the reference (1/0
    for classification, any value in [0, 1] for other task types). The gap of a resample is the
    mean of the per-example differences on it, which is exactly teacher mean minus student mean on
    that resample."""
    teacher = np.asarray(teacher_scores, dtype=float)
    student = np.asarray(student_scores, dtype=float)
    if teacher.shape != student.shape:
        raise ValueError(f"{teacher.size} teacher scores but {student.size} student scores")
    result = mean_ci((teacher - student) * 100.0, n_resamples, seed, confidence)
    result["teacher"] = float(teacher.mean()) if teacher.size else None
    result["student"] = float(student.mean()) if student.size else None
    return result
