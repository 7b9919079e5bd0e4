"""0004: evaluation (judge_scores: every LLM-judge call with its versioned prompt, missing ones too)."""

from stillroom.store.migrations import create_added_tables


def upgrade(conn) -> None:
    create_added_tables(conn, 4)
