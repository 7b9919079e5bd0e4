"""The locked eval set: a manifest of example ids and SHA-256 content hashes, kept in the store and
mirrored to `.stillroom/eval.lock.json` (commit that file: it is the contract).

Verification recomputes the manifest from the data and compares it with both copies; any
difference -- an example edited, added, removed or moved -- is refused with what changed.
Re-locking is an explicit act with a recorded reason.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from stillroom.errors import StillroomError
from stillroom.project import Project
from stillroom.store import tables as T
from stillroom.store.db import now
from stillroom.store.records import all_examples, split_assignments
from stillroom.tasks.base import content_hash

LOCK_FILE = "eval.lock.json"


class LockError(StillroomError):
    """The eval lock is missing, changed or tampered with; the message says what and how to fix it."""


class LeakageError(StillroomError):
    """Training data contains eval inputs; the message lists them."""


@dataclass
class Lock:
    id: int
    manifest_sha256: str
    manifest: list[tuple[int, str]]
    reason: str
    created_at: str

    def as_dict(self) -> dict:
        return {"id": self.id, "manifest_sha256": self.manifest_sha256, "n_examples": len(self.manifest),
                "reason": self.reason, "created_at": self.created_at}


def manifest_digest(manifest: list[tuple[int, str]]) -> str:
    canonical = json.dumps(sorted([int(i), h] for i, h in manifest), separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def current_manifest(conn: Connection) -> list[tuple[int, str]]:
    """The eval split as it is now, hashing each input afresh (so an edited row shows up)."""
    examples = all_examples(conn)
    return sorted(
        (i, content_hash(examples[i].input)) for i, s in split_assignments(conn).items() if s == "eval"
    )


def active_lock(conn: Connection) -> Lock | None:
    row = conn.execute(
        select(T.eval_locks).where(T.eval_locks.c.active.is_(True)).order_by(T.eval_locks.c.id.desc()).limit(1)
    ).first()
    if row is None:
        return None
    return Lock(row.id, row.manifest_sha256, [tuple(x) for x in json.loads(row.manifest)], row.reason,
                row.created_at.isoformat())


def _write_file(project: Project, lock: Lock) -> Path:
    path = project.workspace / LOCK_FILE
    payload = {"lock_id": lock.id, "manifest_sha256": lock.manifest_sha256, "reason": lock.reason,
               "created_at": lock.created_at, "examples": [[i, h] for i, h in lock.manifest]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def lock_eval(project: Project, reason: str = "initial lock", relock: bool = False) -> Lock:
    """Freeze the eval split. Refuses when a lock exists unless `relock` with a reason is given."""
    with project.store.engine.begin() as conn:
        existing = active_lock(conn)
        manifest = current_manifest(conn)
        if not manifest:
            raise LockError("the eval split is empty; run `stillroom split` first")
        digest = manifest_digest(manifest)
        if existing and not relock:
            if existing.manifest_sha256 == digest:
                _write_file(project, existing)
                return existing
            raise LockError(
                f"the eval split is already locked (lock {existing.id}) and no longer matches it; "
                "re-locking invalidates earlier evaluations: run `stillroom lock --relock --reason \"...\"`"
            )
        if relock and (not reason or reason == "initial lock"):
            raise LockError("re-locking needs a recorded reason: --reason \"why the eval set changed\"")
        if existing:
            conn.execute(update(T.eval_locks).where(T.eval_locks.c.id == existing.id).values(active=False))
        created = now()
        res = conn.execute(
            insert(T.eval_locks).values(
                manifest_sha256=digest, n_examples=len(manifest), manifest=json.dumps(manifest),
                reason=reason, active=True, created_at=created,
            )
        )
        lock = Lock(res.inserted_primary_key[0], digest, manifest, reason, created.isoformat())
    _write_file(project, lock)
    return lock


def _describe_diff(locked: list[tuple[int, str]], now_: list[tuple[int, str]]) -> str:
    a, b = dict(locked), dict(now_)
    changed = sorted(i for i in a.keys() & b.keys() if a[i] != b[i])
    removed = sorted(a.keys() - b.keys())
    added = sorted(b.keys() - a.keys())
    parts = []
    for name, ids in (("edited", changed), ("removed from eval", removed), ("added to eval", added)):
        if ids:
            shown = ", ".join(map(str, ids[:8])) + (" ..." if len(ids) > 8 else "")
            parts.append(f"{len(ids)} example(s) {name} (ids {shown})")
    return "; ".join(parts) or "the manifest hash differs"


def verify_lock(project: Project) -> Lock:
    """The active lock, after checking the data, the store and the lock file all agree."""
    with project.store.engine.connect() as conn:
        lock = active_lock(conn)
        if lock is None:
            raise LockError("the eval set is not locked; run `stillroom lock` before training")
        if manifest_digest(lock.manifest) != lock.manifest_sha256:
            raise LockError(f"eval lock {lock.id} in the store is corrupt: its manifest does not match its hash")
        now_ = current_manifest(conn)
    if manifest_digest(now_) != lock.manifest_sha256:
        raise LockError(
            f"the locked eval set changed since lock {lock.id}: {_describe_diff(lock.manifest, now_)}. "
            "Restore the data, or re-lock explicitly: `stillroom lock --relock --reason \"...\"`"
        )
    path = project.workspace / LOCK_FILE
    if path.exists():
        try:
            on_disk = json.loads(path.read_text(encoding="utf-8"))
            disk_manifest = [tuple(x) for x in on_disk["examples"]]
            disk_ok = (on_disk["manifest_sha256"] == lock.manifest_sha256
                       and manifest_digest(disk_manifest) == lock.manifest_sha256)
        except (ValueError, KeyError, TypeError):
            disk_ok = False
        if not disk_ok:
            raise LockError(
                f"{path} does not match eval lock {lock.id} in the store (edited or replaced). "
                "Restore it from version control; `stillroom lock` rewrites it from the store."
            )
    return lock


def find_leaks(project: Project, splits: tuple[str, ...] = ("train", "validation")) -> list[dict]:
    """Training examples whose input equals an eval input exactly or after case/space folding, and
    teacher paraphrases (`curate augment`) of an eval input."""
    from stillroom.curate.augment import parent_links

    with project.store.engine.connect() as conn:
        rows = conn.execute(
            select(T.examples.c.id, T.examples.c.input, T.examples.c.norm_hash, T.splits.c.split)
            .join(T.splits, T.splits.c.example_id == T.examples.c.id)
        ).all()
        parents = parent_links(conn)
    eval_by_norm = {r.norm_hash: r for r in rows if r.split == "eval"}
    leaks = [
        {"example_id": r.id, "split": r.split, "input": r.input,
         "eval_example_id": eval_by_norm[r.norm_hash].id, "eval_input": eval_by_norm[r.norm_hash].input}
        for r in rows if r.split in splits and r.norm_hash in eval_by_norm
    ]
    by_id, found = {r.id: r for r in rows}, {leak["example_id"] for leak in leaks}
    for child, parent in sorted(parents.items()):
        c, p = by_id.get(child), by_id.get(parent)
        if c is not None and p is not None and c.split in splits and p.split == "eval" and child not in found:
            leaks.append({"example_id": child, "split": c.split, "input": c.input, "eval_example_id": parent,
                          "eval_input": p.input})
    return leaks


def check_no_leakage(project: Project) -> None:
    leaks = find_leaks(project)
    if leaks:
        shown = "\n".join(f"  example {l['example_id']} ({l['split']}) {l['input'][:60]!r} ~ eval example "
                          f"{l['eval_example_id']}" for l in leaks[:10])
        raise LeakageError(
            f"training refused: {len(leaks)} training input(s) are eval inputs (exact or case/space-folded):\n"
            f"{shown}\nRun `stillroom split --exclude-leaks` to take them out of training."
        )
