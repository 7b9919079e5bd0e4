"""0001: the initial schema (examples, responses, labels, splits, eval locks, training runs,
predictions, evaluations, routed requests, stage runs)."""

from sqlalchemy import MetaData

from stillroom.store.tables import define


# The schema is declared once, in tables.define. The day a later migration alters a table, the
# declaration as of 0001 must first be frozen into this file, so that 0001 keeps building exactly
# the 0001 schema and the later migration's ALTER applies on top of it.
def upgrade(conn) -> None:
    metadata = MetaData()
    define(metadata)
    metadata.create_all(conn)
