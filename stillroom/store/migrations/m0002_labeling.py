"""0002: the labeling engine (call intents for crash-safe resume, provider batch jobs, review flags)."""

from stillroom.store.migrations import create_added_tables


def upgrade(conn) -> None:
    create_added_tables(conn, 2)
