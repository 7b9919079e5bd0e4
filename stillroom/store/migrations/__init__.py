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
