"""Append-only, versioned migrations. Never edit a released migration; add the next one.

Each migration is a module `mNNNN_name.py` with `upgrade(conn)`; applied versions are recorded in
`schema_migrations`, so opening a store brings it up to date exactly once.
"""

from __future__ import annotations

import importlib
import pkgutil


def all_migrations() -> list[tuple[str, object]]:
    """(version, module) for every migration in this package, in order."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("m"))
    return [(name[1:5], importlib.import_module(f"{__name__}.{name}")) for name in names]


def create_added_tables(conn, version: int) -> None:
    """Create the tables `tables.define` adds at `version` (additive migrations need nothing more)."""
    from sqlalchemy import MetaData

    from stillroom.store.tables import define

    before = set(define(MetaData(), version - 1))
    metadata = MetaData()
    now = define(metadata, version)
    metadata.create_all(conn, tables=[table for name, table in now.items() if name not in before])
