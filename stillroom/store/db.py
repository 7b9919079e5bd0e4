"""Opening the store: SQLite in the workspace by default, PostgreSQL (or any SQLAlchemy URL) by URL."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from sqlalchemy import Column, DateTime, MetaData, String, Table, create_engine, event, inspect, select
from sqlalchemy.engine import Engine

from stillroom.errors import StillroomError
from stillroom.store.migrations import all_migrations

_versions_meta = MetaData()
schema_migrations = Table(
    "schema_migrations", _versions_meta,
    Column("version", String(16), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)


class StoreError(StillroomError):
    """The database cannot be opened or migrated; the message says which and why."""


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def to_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA journal_mode=WAL")  # the gateway writes while a CLI reads
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _normalise_url(url: str) -> str:
    # Users paste libpq-style URLs; SQLAlchemy would pick psycopg2, which we do not install.
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


class Store:
    """A migrated database. `engine` is a plain SQLAlchemy engine; tables are in `stillroom.store.tables`."""

    def __init__(self, url: str):
        self.url = _normalise_url(url)
        try:
            if self.url.startswith("sqlite:///"):
                Path(self.url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(self.url, future=True, pool_pre_ping=True)
        except Exception as exc:  # bad URL, missing driver
            raise StoreError(f"cannot open database {self.safe_url}: {exc}") from None
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.migrate()

    @property
    def safe_url(self) -> str:
        """The URL with any password masked, for messages and reports."""
        try:
            from sqlalchemy.engine import make_url

            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:
            return "<unparseable database URL>"

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def migrate(self) -> list[str]:
        """Apply every migration not yet recorded; returns the versions applied now."""
        applied_now: list[str] = []
        try:
            with self.engine.begin() as conn:
                _versions_meta.create_all(conn)
                if self.dialect == "postgresql":
                    # Two gateway replicas starting together must not both migrate.
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(724201)")
                done = {row[0] for row in conn.execute(select(schema_migrations.c.version))}
                for version, module in all_migrations():
                    if version in done:
                        continue
                    module.upgrade(conn)
                    conn.execute(
                        schema_migrations.insert().values(
                            version=version, name=module.__name__.rsplit(".", 1)[-1], applied_at=now()
                        )
                    )
                    applied_now.append(version)
        except Exception as exc:
            raise StoreError(f"cannot migrate database {self.safe_url}: {exc}") from None
        return applied_now

    def versions(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(schema_migrations.c.version).order_by("version"))]

    def table_names(self) -> list[str]:
        return sorted(inspect(self.engine).get_table_names())

    def close(self) -> None:
        self.engine.dispose()
