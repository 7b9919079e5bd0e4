"""0006: augmentation (teacher paraphrase requests, written before they are sent, and every
paraphrase they returned: the augmented example it became, or why it was rejected or dropped)."""

from stillroom.store.migrations import create_added_tables


def upgrade(conn) -> None:
    create_added_tables(conn, 6)
