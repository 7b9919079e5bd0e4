"""The report's three plots, as PNG bytes (matplotlib, Agg backend, imported only when drawing)."""

from __future__ import annotations

import io

TEACHER_COLOR = "#c0504d"
STUDENT_COLOR = "#2f6f9f"
ACCENT_COLOR = "#6a9f3f"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display; never pick up a GUI backend from the environment
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def confusion_png(confusion: list[list[int]], labels: list[str], title: str = "Confusion matrix") -> bytes:
    """Heatmap with counts; rows are the teacher's labels, columns the student's."""
    plt = _pyplot()
    n = len(labels)
    size = max(3.6, 0.55 * n + 2.2)
    fig, ax = plt.subplots(figsize=(size + 0.8, size))
    im = ax.imshow(confusion, cmap="Blues", vmin=0)
    top = max((max(row) for row in confusion if row), default=0)
    for i, row in enumerate(confusion):
        for j, value in enumerate(row):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=9,
                    color="white" if top and value > top / 2 else "#222")
    ax.set_xticks(range(n), labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("student")
    ax.set_ylabel("teacher")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def coverage_png(curve: list[dict], threshold: float | None, target: float | None) -> bytes:
    """Coverage and the student's agreement on what it covers, against the confidence threshold,
    with the calibrated threshold and the target agreement marked."""
    plt = _pyplot()
    xs = [p["threshold"] for p in curve]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.plot(xs, [p["coverage"] for p in curve], color=STUDENT_COLOR, marker="o", ms=3, label="coverage")
    ax.plot(xs, [p["student_agreement_on_covered"] if p["student_agreement_on_covered"] is not None
                 else float("nan") for p in curve],
            color=ACCENT_COLOR, marker="o", ms=3, label="student agreement on covered")
    if target is not None:
        ax.axhline(target, color="#888", ls=":", lw=1, label=f"target {target:.0%}")
    if threshold is not None:
        shown = min(threshold, 1.0)
        ax.axvline(shown, color=TEACHER_COLOR, ls="--", lw=1.2,
                   label=f"chosen threshold {threshold:.2f}" + (" (serves nothing)" if threshold > 1 else ""))
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence threshold")
    ax.set_ylabel("share of eval inputs")
    ax.set_title("Coverage vs agreement (eval split)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _png(fig)


def cost_png(teacher_only: float, student_hosting: float, teacher_fallback: float) -> bytes:
    """Monthly cost: teacher only vs routed (student hosting stacked under teacher fallback)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    ax.bar(["teacher only"], [teacher_only], color=TEACHER_COLOR, width=0.55, label="teacher")
    ax.bar(["routed"], [student_hosting], color=STUDENT_COLOR, width=0.55, label="student hosting")
    ax.bar(["routed"], [teacher_fallback], bottom=[student_hosting], color=TEACHER_COLOR, alpha=0.55,
           width=0.55, label="teacher fallback")
    routed = student_hosting + teacher_fallback
    for x, total in ((0, teacher_only), (1, routed)):
        ax.text(x, total, f"${total:,.0f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylim(0, max(teacher_only, routed, 1e-9) * 1.18)
    ax.set_ylabel("$ per month")
    ax.set_title("Monthly cost")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    return _png(fig)
