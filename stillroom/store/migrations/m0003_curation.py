"""0003: curation (review flags and decisions, redacted copies, the embedding cache, exclusions,
dataset versions)."""

from stillroom.store.migrations import create_added_tables


def upgrade(conn) -> None:
    create_added_tables(conn, 3)
