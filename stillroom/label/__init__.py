"""Labeling: ask the teacher (live, batch API, or fanned out over Ray), record every call, vote."""

from stillroom.label.engine import LabelingError, LabelProgress, LabelReport, label_examples

__all__ = ["LabelProgress", "LabelReport", "LabelingError", "label_examples"]
