"""0005: exported student artifacts (adapter, merged, int8, GGUF) with their re-evaluation."""

from stillroom.store.migrations import create_added_tables


def upgrade(conn) -> None:
    create_added_tables(conn, 5)
