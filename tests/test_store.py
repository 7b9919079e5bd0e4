from sqlalchemy import select

from conftest import synthetic_rows
from stillroom.store import tables as T
from stillroom.store.db import Store, StoreError, schema_migrations
from stillroom.store.migrations import all_migrations

import pytest


def test_migrations_apply_once_and_are_recorded(db_url):
    store = Store(db_url)
    versions = [v for v, _ in all_migrations()]
    assert store.versions() == versions
    assert set(T.TABLES) <= set(store.table_names())
    assert Store(db_url).migrate() == []  # re-opening applies nothing
    with store.engine.connect() as conn:
        assert conn.execute(select(schema_migrations.c.name)).scalars().all()[0] == "m0001_initial"
    store.close()


def test_pipeline_records_round_trip(db_url, make_project):
    """Import -> split -> lock on each database, then read back through a second connection."""
    from stillroom.capture.importers import import_file
    from stillroom.curate.lock import lock_eval, verify_lock
    from stillroom.curate.split import split_project
    from stillroom.store.records import counts

    project = make_project(synthetic_rows(10), extra=f"database: {{url: '{db_url}'}}\n")
    assert project.store.dialect == ("sqlite" if db_url.startswith("sqlite") else "postgresql")
    import_file(project, project.root / "data.jsonl")
    assert import_file(project, project.root / "data.jsonl").examples_added == 0
    split_project(project)
    lock = lock_eval(project)
    assert verify_lock(project).manifest_sha256 == lock.manifest_sha256
    other = Store(db_url)
    with other.engine.connect() as conn:
        c = counts(conn)
    assert c["examples"] == 30 and c["teacher_labelled"] == 30 and sum(c["splits"].values()) == 30
    other.close()


def test_bad_database_url_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="cannot"):
        Store("postgresql://nobody:secret@127.0.0.1:1/none")
    with pytest.raises(StoreError) as err:
        Store("postgresql://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(err.value)
