"""0001: the initial schema (examples, responses, labels, splits, eval locks, training runs,
predictions, evaluations, routed requests, stage runs)."""

from stillroom.store.migrations import create_added_tables


def upgrade(conn) -> None:
    create_added_tables(conn, 1)
