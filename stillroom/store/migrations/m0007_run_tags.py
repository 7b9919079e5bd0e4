"""0007: training runs tagged with the sweep that trained them and where they came from
(trained here, or an adapter trained elsewhere and imported)."""


def upgrade(conn) -> None:
    # Columns on an existing table: explicit ALTERs (create_added_tables only creates tables).
    # Nullable, so rows written before this migration read as "trained here, not in a sweep".
    conn.exec_driver_sql("ALTER TABLE training_runs ADD COLUMN sweep_id VARCHAR(64)")
    conn.exec_driver_sql("ALTER TABLE training_runs ADD COLUMN provenance VARCHAR(16)")
