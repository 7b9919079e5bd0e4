"""The report's plots, as PNG bytes (matplotlib, Agg backend, imported only when drawing)."""

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


def reliability_png(curve: list[dict], ece: float | None, title: str = "Reliability (eval split, vs teacher)") -> bytes:
    """Accuracy against mean confidence per equal-width bin, bar width = the bin, with the diagonal
    of perfect calibration and each bin's count; empty bins are left blank, not drawn at zero."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.plot([0, 1], [0, 1], color="#888", ls=":", lw=1, label="perfectly calibrated")
    filled = [b for b in curve if b["n"]]
    ax.bar([(b["low"] + b["high"]) / 2 for b in filled], [b["accuracy"] for b in filled],
           width=[(b["high"] - b["low"]) * 0.92 for b in filled], color=STUDENT_COLOR, alpha=0.75,
           label="agreement in bin")
    ax.plot([b["mean_confidence"] for b in filled], [b["accuracy"] for b in filled], color=TEACHER_COLOR,
            marker="o", ms=4, lw=1, label="at mean confidence")
    for b in filled:
        ax.text((b["low"] + b["high"]) / 2, min(b["accuracy"] + 0.02, 1.0), str(b["n"]), ha="center",
                va="bottom", fontsize=7, color="#444")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel("student confidence")
    ax.set_ylabel("agreement with the teacher")
    ax.set_title(title + (f"\nECE {ece:.3f}" if ece is not None else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def slice_gaps_png(slices: list[dict], allowed: float, slice_limit: float, min_examples: int,
                   title: str = "Gap to the teacher by slice") -> bytes:
    """Horizontal bars: each slice's gap in points, the allowed gap and the slice-rule limit marked;
    slices too small to be gated are drawn pale."""
    plt = _pyplot()
    rows = list(reversed(slices))
    fig, ax = plt.subplots(figsize=(7.2, max(2.4, 0.32 * len(rows) + 1.2)))
    colors = [(TEACHER_COLOR if s["gap_points"] > slice_limit else STUDENT_COLOR) for s in rows]
    alphas = [0.9 if s["n"] >= min_examples else 0.35 for s in rows]
    for k, (s, c, a) in enumerate(zip(rows, colors, alphas)):
        ax.barh(k, s["gap_points"], color=c, alpha=a)
        ax.text(s["gap_points"], k, f" {s['gap_points']:.1f} (n={s['n']})", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{s['kind']}: {s['name']}"[:40] for s in rows], fontsize=8)
    ax.axvline(allowed, color="#888", ls=":", lw=1, label=f"allowed gap {allowed:g}")
    ax.axvline(slice_limit, color=TEACHER_COLOR, ls="--", lw=1, label=f"slice limit {slice_limit:g}")
    ax.axvline(0, color="#222", lw=0.8)
    ax.set_xlabel("teacher minus student, percentage points (pale: fewer than "
                  f"{min_examples} examples, not gated)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def field_scores_png(per_field: dict, title: str = "Per-field precision / recall / F1 (vs teacher)") -> bytes:
    """Grouped horizontal bars per extracted field: precision, recall and F1, with each field's support."""
    plt = _pyplot()
    names = list(per_field)[::-1]
    fig, ax = plt.subplots(figsize=(7.2, max(2.4, 0.55 * len(names) + 1.2)))
    height = 0.26
    for k, (metric, color) in enumerate((("precision", STUDENT_COLOR), ("recall", ACCENT_COLOR), ("f1", TEACHER_COLOR))):
        values = [per_field[n][metric] if per_field[n][metric] is not None else 0.0 for n in names]
        ax.barh([i + (k - 1) * height for i in range(len(names))], values, height=height, color=color,
                label=metric if metric != "f1" else "F1")
    for i, n in enumerate(names):
        ax.text(1.01, i, f"n={per_field[n]['support']}", va="center", fontsize=7, color="#444")
    ax.set_yticks(range(len(names)), [n[:40] for n in names], fontsize=8)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("share of (field, value) pairs (n = pairs in the teacher's records)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def lengths_png(length: dict, title: str = "Answer length in words (eval split)") -> bytes:
    """Histogram of answer lengths, student vs teacher, over the fixed word-count buckets."""
    plt = _pyplot()
    edges = length["edges"]
    labels = [f"{a}-{b - 1}" for a, b in zip(edges, edges[1:])] + [f"{edges[-1]}+"]
    used = [k for k in range(len(labels)) if length["prediction_histogram"][k] or length["reference_histogram"][k]]
    used = list(range(min(used), max(used) + 1)) if used else list(range(len(labels)))
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs = list(range(len(used)))
    ax.bar([x - 0.2 for x in xs], [length["reference_histogram"][k] for k in used], width=0.4,
           color=TEACHER_COLOR, alpha=0.8, label="teacher")
    ax.bar([x + 0.2 for x in xs], [length["prediction_histogram"][k] for k in used], width=0.4,
           color=STUDENT_COLOR, alpha=0.8, label="student")
    ax.set_xticks(xs, [labels[k] for k in used], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel("words")
    ax.set_ylabel("answers")
    ratio = length.get("ratio")
    ax.set_title(title + (f"\nstudent/teacher mean length {ratio:.2f}" if ratio is not None else ""), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
