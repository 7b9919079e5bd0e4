"""`stillroom curate augment`: teacher paraphrases of train inputs, kept as train-only examples.

The run, top to bottom:
1. choose parents: train examples with a training label -- never validation, calibration or eval
   (a paraphrase of an eval input would leak it into training), never an augmented example, never
   one asked before -- optionally only some labels, only flagged examples, or only as many as keep
   each label at or under `per_label_max` (rarest labels first).
2. ask: one teacher call per parent for k paraphrases as a JSON array (prompt `PROMPT_VERSION`) of
   its input as `curate/pii.py` redacts it (`[EMAIL]`, `[CARD]`, ...: the paraphrases keep the
   placeholders, so a parent's personal data never reaches the teacher nor its paraphrases),
   sent by the labeling engine (`engine.run_live`): the request is in `augment_requests` and its
   intent in `label_intents` before it is sent, its request hash is the Idempotency-Key, its answer
   is committed the moment it returns (`responses`, role 'augment'), and `max_cost` stops the run
   before spend could cross it. Nothing answered is sent again; a killed run resumes.
3. accept: every answer not yet processed is parsed, and each paraphrase is rejected with a reason
   (kept in `augmentations`) when it is empty, over-long, beyond the k asked for, a case/space-folded
   copy of its parent or of any input in the store, or a MiniLM near-duplicate
   (`curation.dedupe.threshold`) of an eval or calibration input. The others become examples
   tagged 'augmented', labelled with the parent's label (provenance 'augmented'), in train.
4. verify (optional): the teacher labels each paraphrase through `label_examples`; a paraphrase
   whose label differs from its parent's is dropped.

What trains is decided in `curate/datasets.py` through `apply_to_training_labels`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection

from stillroom.errors import StillroomError
from stillroom.label import ledger
from stillroom.label.engine import (Budget, Call, Item, LabelProgress, LabelReport, Plan, call_cost, check_input,
                                    run_live)
from stillroom.store import tables as T
from stillroom.store.db import now
from stillroom.store.records import add_label, all_examples, get_or_add_example, split_assignments
from stillroom.tasks.base import ParseError, content_hash, norm_hash

__all__ = ["AugmentError", "AugmentReport", "augment", "parse_paraphrases", "augmented_ids",
           "apply_to_training_labels", "PROMPT_VERSION"]

PROMPT_VERSION = "paraphrase-v1"
PROMPT = (
    "Rewrite the message below in {k} different ways. Each rewrite must mean exactly the same: keep the "
    "request, the intent and every fact (names, numbers, products, places), so that it would be handled "
    "exactly like the original. Vary the wording, word order and tone, the way different people would "
    "write it. Do not answer the message.\n"
    "Reply with a JSON array of {k} strings and nothing else.\n\n"
    "Message: {input}"
)
ROLE = "augment"  # responses.role of the paraphrase answers
TAG = "augmented"
PROVENANCE = "augmented"
MAX_K = 20
ALIVE = ("kept", "unverified")

REQUESTS = T.TABLES["augment_requests"]
AUGMENTATIONS = T.TABLES["augmentations"]


class AugmentError(StillroomError):
    """Augmentation cannot run as asked; the message says why and what to change."""


def teacher_messages(text: str, k: int) -> list[dict]:
    return [{"role": "user", "content": PROMPT.format(k=k, input=text)}]


def default_max_tokens(k: int) -> int:
    return 64 + 128 * k  # room for k rewrites of a support-message-sized input


def max_length(parent: str, max_input_chars: int) -> int:
    """A paraphrase far longer than its input is an answer or an essay, not a rewrite."""
    return min(max_input_chars, 3 * len(parent) + 60)


_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)```", re.S)


def parse_paraphrases(output: str) -> list:
    """The items of the JSON array in a teacher's answer; a code fence or a sentence around the array
    is tolerated. Raises ParseError (one sentence) when there is no parseable array."""
    text = output.strip()
    fenced = _FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    start, end = text.find("["), text.rfind("]")
    shown = output if len(output) <= 80 else output[:77] + "..."
    if start < 0:
        raise ParseError(f"the answer {shown!r} holds no JSON array")
    if end < start:
        raise ParseError(f"the JSON array in the answer {shown!r} is cut off (no closing ']'; if the teacher "
                         "ran out of tokens, raise --max-tokens)")
    try:
        value = json.loads(text[start:end + 1])
    except ValueError as exc:
        raise ParseError(f"the JSON array in the answer {shown!r} does not parse ({exc})") from None
    return value


# ---- what the rest of curation needs to know ------------------------------------------------------


def augmented_ids(conn: Connection) -> set[int]:
    """Every example that is a paraphrase (whatever its status): train-only, never a parent."""
    return {i for (i,) in conn.execute(select(AUGMENTATIONS.c.example_id).where(AUGMENTATIONS.c.example_id.isnot(None)))}


def parent_links(conn: Connection) -> dict[int, int]:
    """{augmented example: its parent}."""
    return dict(conn.execute(select(AUGMENTATIONS.c.example_id, AUGMENTATIONS.c.parent_id)
                             .where(AUGMENTATIONS.c.example_id.isnot(None))).all())


def apply_to_training_labels(conn: Connection, labels: dict[int, str], source: dict[int, str],
                             splits: dict[int, str]) -> dict[int, int]:
    """Put the paraphrases that train into `labels` / `source` (in place); returns {paraphrase: parent}.

    A paraphrase trains while it is kept (verified or never checked), it and its parent are in train,
    and its parent has a training label; it takes the parent's current label (so a reviewer's fix of
    the parent carries over), unless a reviewer fixed or discarded the paraphrase itself."""
    rows = conn.execute(select(AUGMENTATIONS.c.example_id, AUGMENTATIONS.c.parent_id, AUGMENTATIONS.c.status)
                        .where(AUGMENTATIONS.c.example_id.isnot(None))).all()
    if not rows:
        return {}
    from stillroom.curate.review import latest_decisions

    decisions = latest_decisions(conn)
    parents = {}
    for child, parent, status in rows:
        fixed = labels.get(child) if source.get(child) == "review" else None
        labels.pop(child, None)  # a verified paraphrase also has a teacher label: the parent's decides
        source.pop(child, None)
        if status != "kept" or splits.get(child) != "train" or splits.get(parent) != "train" or parent not in labels:
            continue
        if child in decisions and decisions[child].decision == "discard":
            continue
        labels[child], source[child] = (fixed, "review") if fixed is not None else (labels[parent], PROVENANCE)
        parents[child] = parent
    return parents


# ---- report ---------------------------------------------------------------------------------------


@dataclass
class AugmentReport:
    model: str
    k: int
    prompt_version: str = PROMPT_VERSION
    dry_run: bool = False
    parents_eligible: int = 0  # train examples that could be asked (after the filters, before caps and limit)
    parents_asked: int = 0  # new parents asked this run
    parents_resumed: int = 0  # asked by an earlier run that stopped before the answer was on record
    already_asked: int = 0  # --ids that were asked before (not asked again)
    skipped: list[dict] = field(default_factory=list)  # {example_id, reason}: not sent
    calls_total: int = 0
    calls_paid: int = 0
    calls_failed: int = 0
    calls_not_sent: int = 0
    resumed_in_flight: int = 0
    retries: int = 0
    spent_usd: float = 0.0  # paraphrase calls and verify calls together
    projected_usd: float = 0.0
    max_cost_usd: float | None = None
    stopped: str | None = None
    answers_processed: int = 0
    paraphrases_returned: int = 0
    created: int = 0  # new augmented examples
    rejected: dict[str, int] = field(default_factory=dict)  # reason code -> count
    rejections: list[dict] = field(default_factory=list)  # {parent_id, position, text, reason}, first 100
    failures: list[dict] = field(default_factory=list)
    verify: dict | None = None
    would_send: list[dict] = field(default_factory=list)  # dry run: the first calls' messages
    by_label: dict[str, dict] = field(default_factory=dict)  # train originals and live paraphrases per label
    pii: dict | None = None  # parents whose input was sent redacted, findings by type (curate/pii.py)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        out = asdict(self)
        out["spent_usd"] = round(self.spent_usd, 6)
        out["projected_usd"] = round(self.projected_usd, 6)
        out["seconds"] = round(self.seconds, 2)
        return out

    def reject(self, row: dict) -> None:
        code = row["reason"].split(":", 1)[0]
        self.rejected[code] = self.rejected.get(code, 0) + 1
        if len(self.rejections) < 100:
            self.rejections.append({k: row[k] for k in ("parent_id", "position", "text", "reason")})


# ---- 1. choose ------------------------------------------------------------------------------------


@dataclass
class _State:
    labels: dict[int, str]  # training labels (review applied), originals only
    splits: dict[int, str]
    examples: dict
    asked: set[int]  # parents with a request (any settings)
    children: set[int]
    flagged: set[int]
    alive: Counter  # live paraphrases per label (kept / unverified)
    open_by_label: Counter  # requests without processed answers, per parent label


def _read_state(project) -> _State:
    from stillroom.curate.review import review_flags, training_labels

    with project.store.engine.connect() as conn:
        labels, _ = training_labels(conn, project.task.labels)
        children = augmented_ids(conn)
        for child in children:
            labels.pop(child, None)
        asked = {p for (p,) in conn.execute(select(REQUESTS.c.parent_id))}
        processed = {r for (r,) in conn.execute(select(AUGMENTATIONS.c.request_id).distinct())}
        open_parents = [p for rid, p in conn.execute(select(REQUESTS.c.id, REQUESTS.c.parent_id)) if rid not in processed]
        alive = Counter(lab for (lab,) in conn.execute(select(AUGMENTATIONS.c.label)
                                                       .where(AUGMENTATIONS.c.status.in_(ALIVE))))
        state = _State(labels, split_assignments(conn), all_examples(conn), asked, children,
                       set(review_flags(conn)), alive, Counter())
    state.open_by_label = Counter(labels[p] for p in open_parents if p in labels)
    return state


def _check_ids(state: _State, ids: list[int]) -> None:
    for i in ids:
        split = state.splits.get(i)
        if i not in state.examples:
            raise AugmentError(f"--ids: there is no example {i} in this project")
        if i in state.children:
            raise AugmentError(f"--ids: example {i} is itself an augmented paraphrase; paraphrase its parent instead")
        if split != "train":
            raise AugmentError(f"--ids: example {i} is in the {split or 'unassigned'} split; only train examples are "
                               "paraphrased (a paraphrase of a validation, calibration or eval input would leak it)")
        if i not in state.labels:
            raise AugmentError(f"--ids: example {i} has no training label (unlabelled, rejected by QC or discarded "
                               "in review), so its paraphrases would have nothing to inherit")


def _choose(state: _State, k: int, labels: list[str] | None, flagged_only: bool, per_label_max: int | None,
            limit: int | None, ids: list[int] | None, report: AugmentReport) -> list[int]:
    """New parents to ask, rarest labels first, round-robin across labels in a seeded order."""
    pool = [i for i, s in state.splits.items()
            if s == "train" and i in state.labels and i not in state.children]
    if ids is not None:
        _check_ids(state, ids)
        wanted = set(ids)
        report.already_asked = len(wanted & state.asked)
        pool = [i for i in pool if i in wanted]
    if labels is not None:
        pool = [i for i in pool if state.labels[i] in labels]
    if flagged_only:
        pool = [i for i in pool if i in state.flagged]
    pool = [i for i in pool if i not in state.asked]
    report.parents_eligible = len(pool)
    train_count = Counter(state.labels[i] for i, s in state.splits.items()
                          if s == "train" and i in state.labels and i not in state.children)
    have = {lab: train_count[lab] + state.alive[lab] + k * state.open_by_label[lab] for lab in train_count}
    by_label: dict[str, list[int]] = defaultdict(list)
    for i in sorted(pool):
        by_label[state.labels[i]].append(i)
    queues = []
    for lab in sorted(by_label, key=lambda lab: (have.get(lab, 0), lab)):
        members = by_label[lab]
        random.Random(f"augment:{lab}").shuffle(members)
        if per_label_max is not None:
            room = per_label_max - have.get(lab, 0)
            members = members[:max(0, math.ceil(room / k))]
        queues.append(members)
    chosen = []
    for rank in range(max((len(q) for q in queues), default=0)):
        chosen += [q[rank] for q in queues if rank < len(q)]
    return chosen[:limit] if limit is not None else chosen


# ---- 3. accept ------------------------------------------------------------------------------------


def _accept(project, status: str, per_label_max: int | None, report: AugmentReport) -> None:
    """Turn every recorded, not yet processed paraphrase answer into examples or recorded rejections."""
    from stillroom.curate.dedupe import cached_embeddings, pairs_above
    from stillroom.curate.review import training_labels

    Q, A, R, E = REQUESTS, AUGMENTATIONS, T.responses, T.examples
    engine = project.store.engine
    with engine.connect() as conn:
        todo = conn.execute(
            select(Q.c.id, Q.c.parent_id, Q.c.k, R.c.id.label("response_id"), R.c.output)
            .join(R, (R.c.request_hash == Q.c.request_hash) & (R.c.role == ROLE))
            .where(~select(A.c.id).where(A.c.request_id == Q.c.id).exists()).order_by(Q.c.id)).all()
        if not todo:
            return
        labels, _ = training_labels(conn, project.task.labels)
        splits = split_assignments(conn)
        parent_text = dict(conn.execute(select(E.c.id, E.c.input).where(E.c.id.in_({q.parent_id for q in todo}))).all())
        held_out = conn.execute(select(E.c.id, E.c.input, E.c.content_hash, T.splits.c.split)
                                .join(T.splits, T.splits.c.example_id == E.c.id)
                                .where(T.splits.c.split.in_(("eval", "calibration")))).all()
    max_chars = project.config.labeling.max_input_chars
    decided: list[dict] = []  # rejected rows
    candidates: list[tuple[dict, str, str, int]] = []  # (row, text, label, response id)
    seen: dict[str, str] = {}  # norm hash -> which paraphrase of this pass has that text
    for q in todo:
        report.answers_processed += 1
        base = {"request_id": q.id, "parent_id": q.parent_id, "text": None, "status": "rejected"}
        label = labels.get(q.parent_id) if splits.get(q.parent_id) == "train" else None
        if label is None:
            decided.append({**base, "position": -1, "reason": f"parent_not_training: example {q.parent_id} no longer "
                                                              "trains in the train split (excluded, discarded or relabelled "
                                                              "outside the label set)"})
            continue
        try:
            items = parse_paraphrases(q.output)
        except ParseError as exc:
            decided.append({**base, "position": -1, "reason": f"unparseable: {exc}"})
            continue
        if not isinstance(items, list) or not items:
            decided.append({**base, "position": -1, "reason": "unparseable: the answer's JSON array is empty"})
            continue
        report.paraphrases_returned += len(items)
        parent = parent_text[q.parent_id]
        for pos, item in enumerate(items):
            text = item.strip() if isinstance(item, str) else None
            row = {**base, "position": pos, "text": text if text is not None else json.dumps(item, ensure_ascii=False)[:2000]}
            if pos >= q.k:
                reason = f"beyond_k: the answer holds {len(items)} paraphrases, {q.k} were asked for"
            elif text is None:
                reason = f"not_text: item {pos} of the JSON array is a {type(item).__name__}, not a string"
            elif not text:
                reason = "empty: an empty paraphrase"
            elif "\x00" in text:
                reason = "not_text: the paraphrase contains NUL characters"
            elif len(text) > max_length(parent, max_chars):
                reason = (f"over_long: {len(text)} characters for an input of {len(parent)} "
                          f"(at most {max_length(parent, max_chars)})")
            elif norm_hash(text) == norm_hash(parent):
                reason = "same_as_parent: the paraphrase is the parent's text (after case/space folding)"
            elif norm_hash(text) in seen:
                reason = f"duplicate: the same text as {seen[norm_hash(text)]} (after case/space folding)"
            else:
                seen[norm_hash(text)] = f"paraphrase {pos} of example {q.parent_id}"
                candidates.append((row, text, label, q.response_id))
                continue
            decided.append({**row, "reason": reason})

    # A copy of any input already in the store (eval included) is no new example.
    folded = {norm_hash(text) for _, text, _, _ in candidates}
    existing: dict[str, tuple[int, str | None]] = {}
    with engine.connect() as conn:
        hashes = sorted(folded)
        for start in range(0, len(hashes), 500):
            for i, h in conn.execute(select(E.c.id, E.c.norm_hash).where(E.c.norm_hash.in_(hashes[start:start + 500]))):
                existing.setdefault(h, (i, splits.get(i)))
    survivors = []
    for row, text, label, rid in candidates:
        hit = existing.get(norm_hash(text))
        if hit is not None:
            where = f"{hit[1]} example {hit[0]}" if hit[1] else f"example {hit[0]}"
            decided.append({**row, "reason": f"duplicate: a copy of {where} (after case/space folding)"})
        else:
            survivors.append((row, text, label, rid))

    # Near-copies of held-out inputs would leak them into training (the MiniLM check of `curate dedupe`).
    threshold = project.config.curation.dedupe.threshold
    if survivors and held_out:
        texts = {content_hash(text): text for _, text, _, _ in survivors}
        texts.update({r.content_hash: r.input for r in held_out})
        index, matrix, _ = cached_embeddings(engine, texts)
        C = matrix[[index[content_hash(text)] for _, text, _, _ in survivors]]
        H = matrix[[index[r.content_hash] for r in held_out]]
        best: dict[int, tuple[float, int]] = {}
        for i, j, s in zip(*(a.tolist() for a in pairs_above(C, H, threshold))):
            if i not in best or s > best[i][0]:
                best[i] = (s, j)
        kept = []
        for n, item in enumerate(survivors):
            if n in best:
                s, j = best[n]
                decided.append({**item[0], "reason": f"near_held_out: a near-duplicate of {held_out[j].split} example "
                                                     f"{held_out[j].id} (cosine {s:.3f} >= {threshold})"})
            else:
                kept.append(item)
        survivors = kept

    with engine.begin() as conn:
        count = Counter()
        if per_label_max is not None:
            children = augmented_ids(conn)
            count = Counter(lab for i, lab in labels.items() if splits.get(i) == "train" and i not in children)
            count.update(lab for (lab,) in conn.execute(select(A.c.label).where(A.c.status.in_(ALIVE))))
        stamp = now()
        for row, text, label, rid in survivors:
            if per_label_max is not None and count[label] >= per_label_max:
                decided.append({**row, "reason": f"over_cap: label '{label}' already has {count[label]} train "
                                                 f"examples (--per-label-max {per_label_max})"})
                continue
            count[label] += 1
            example_id, created = get_or_add_example(conn, text, "augment", [TAG])
            if not created:  # written by another run meanwhile
                decided.append({**row, "reason": f"duplicate: a copy of example {example_id}"})
                continue
            add_label(conn, example_id, label, PROVENANCE, f"augment:example {row['parent_id']} {PROMPT_VERSION}", rid)
            conn.execute(insert(T.splits).values(example_id=example_id, split="train", seed=-1, created_at=stamp))
            conn.execute(insert(A).values(**{**row, "status": status}, example_id=example_id, label=label,
                                          created_at=stamp, updated_at=stamp))
            report.created += 1
        for row in decided:
            conn.execute(insert(A).values(**row, created_at=stamp, updated_at=stamp))
            report.reject(row)


# ---- 4. verify ------------------------------------------------------------------------------------


def _verify(project, report: AugmentReport, limit_usd: float | None,
            progress: Callable[[LabelProgress], None] | None) -> None:
    """Label every unverified paraphrase with the teacher; drop those whose label differs from the parent's."""
    from stillroom.curate.review import training_labels
    from stillroom.label.engine import label_examples
    from stillroom.store.records import teacher_labels

    A = AUGMENTATIONS
    engine = project.store.engine
    with engine.connect() as conn:
        todo = conn.execute(select(A.c.id, A.c.example_id, A.c.parent_id, A.c.label).where(
            A.c.example_id.isnot(None), A.c.status.in_(ALIVE), A.c.verified_label.is_(None))).all()
    result = {"checked": len(todo), "kept": 0, "dropped": 0, "awaiting": 0, "calls_paid": 0, "calls_failed": 0,
              "spent_usd": 0.0, "dropped_examples": []}
    report.verify = result
    if not todo:
        return
    remaining = None if limit_usd is None else limit_usd - report.spent_usd
    if remaining is not None and remaining <= 0:
        result["awaiting"] = len(todo)
        report.stopped = report.stopped or f"budget: nothing left of --max-cost ${limit_usd:.4f} to verify with"
        return
    labelled = label_examples(project, example_ids=[r.example_id for r in todo], max_cost=remaining, progress=progress)
    result.update(calls_paid=labelled.calls_paid, calls_failed=labelled.calls_failed,
                  spent_usd=round(labelled.spent_usd, 6))
    report.spent_usd += labelled.spent_usd
    if labelled.stopped and not report.stopped:
        report.stopped = f"verify: {labelled.stopped}"
    flags = ledger.FLAGS
    with engine.begin() as conn:
        teacher = teacher_labels(conn)
        parent_label, _ = training_labels(conn, project.task.labels)
        no_label = dict(conn.execute(select(flags.c.example_id, flags.c.kind).where(
            flags.c.example_id.in_([r.example_id for r in todo]),
            flags.c.kind.in_(("tie", "no_valid_answer", "bad_input")))).all())
        for r in todo:
            said, expected = teacher.get(r.example_id), parent_label.get(r.parent_id, r.label)
            values: dict = {"updated_at": now()}
            if said is not None and said == expected:
                values.update(status="kept", verified_label=said)
                result["kept"] += 1
            elif said is not None:
                values.update(status="dropped", verified_label=said,
                              reason=f"label_changed: the teacher labels it '{said}', its parent is '{expected}'")
            elif r.example_id in no_label:
                values.update(status="dropped", reason=f"no_label: the teacher gave it no label ({no_label[r.example_id]})")
            else:  # failed or not sent (budget): stays as it is until a later --verify
                result["awaiting"] += 1
                continue
            if values["status"] == "dropped":
                result["dropped"] += 1
                result["dropped_examples"].append({"example_id": r.example_id, "parent_id": r.parent_id,
                                                   "reason": values["reason"]})
            conn.execute(update(A).where(A.c.id == r.id).values(**values))


# ---- entry point ----------------------------------------------------------------------------------


def _by_label(project) -> dict[str, dict]:
    with project.store.engine.connect() as conn:
        from stillroom.curate.review import training_labels

        labels, _ = training_labels(conn, project.task.labels)
        splits = split_assignments(conn)
        children = augmented_ids(conn)
        alive = Counter(lab for lab, status in conn.execute(select(AUGMENTATIONS.c.label, AUGMENTATIONS.c.status))
                        if status == "kept")
    train = Counter(lab for i, lab in labels.items() if splits.get(i) == "train" and i not in children)
    return {lab: {"train": train[lab], "paraphrases_kept": alive[lab]} for lab in project.task.labels}


def augment(project, k: int = 2, labels: list[str] | None = None, flagged_only: bool = False,
            per_label_max: int | None = None, limit: int | None = None, ids: list[int] | None = None,
            max_cost: float | None = None, verify: bool = False, dry_run: bool = False,
            temperature: float | None = 0.7, max_tokens: int | None = None,
            progress: Callable[[LabelProgress], None] | None = None,
            verify_progress: Callable[[LabelProgress], None] | None = None) -> AugmentReport:
    """Ask the teacher for `k` paraphrases of train inputs and keep the good ones as train-only
    examples tagged 'augmented' (see the module docstring). `max_cost` (USD, default
    `labeling.max_cost_usd`) covers paraphrase and verify calls together; `dry_run` sends nothing and
    reports the calls and their worst-case cost."""
    started = time.perf_counter()
    cfg = project.config
    if not 1 <= k <= MAX_K:
        raise AugmentError(f"--k must be between 1 and {MAX_K} paraphrases per input, got {k}")
    for name, value in (("--per-label-max", per_label_max), ("--limit", limit), ("--max-tokens", max_tokens)):
        if value is not None and value < 1:
            raise AugmentError(f"{name} must be at least 1, got {value}")
    if max_cost is not None and max_cost <= 0:
        raise AugmentError(f"--max-cost must be a positive amount in USD, got {max_cost}")
    if temperature is not None and not 0 <= temperature <= 2:
        raise AugmentError(f"--temperature must be between 0 and 2, got {temperature}")
    if getattr(cfg.task, "type", "classification") != "classification":
        raise AugmentError(f"augmentation keeps the parent's label, so it is for classification tasks; task.type "
                           f"is '{cfg.task.type}'")
    if labels is not None:
        unknown = [lab for lab in labels if lab not in project.task.labels]
        if unknown:
            raise AugmentError(f"--labels: unknown label(s) {', '.join(unknown)}; the task's labels are "
                               f"{', '.join(project.task.labels)}")
    if not dry_run and cfg.teacher.backend == "recorded":
        raise AugmentError("teacher.backend is 'recorded' (answers imported from logs), so there is no teacher to "
                           "ask for paraphrases: set teacher.backend to 'openai' (with teacher.base_url), 'litellm' "
                           "or 'local' in stillroom.yaml")
    from stillroom.curate.lock import verify_lock

    verify_lock(project)  # paraphrases are checked against the locked eval set, so it must be final
    teacher = cfg.teacher
    params = {"max_tokens": max_tokens or default_max_tokens(k), "temperature": temperature}
    limit_usd = max_cost if max_cost is not None else cfg.labeling.max_cost_usd
    report = AugmentReport(teacher.model, k, dry_run=dry_run, max_cost_usd=limit_usd)

    from stillroom.curate.pii import Redactor

    redactor = Redactor.for_project(project)
    state = _read_state(project)
    chosen = _choose(state, k, labels, flagged_only, per_label_max, limit, ids, report)
    new: list[tuple[int, list[dict], str]] = []
    for parent in chosen:
        text, notes = check_input(redactor(state.examples[parent].input), cfg.labeling.max_input_chars, "reject")
        if text is None:
            report.skipped.append({"example_id": parent, "reason": notes[-1][1]})
            continue
        messages = teacher_messages(text, k)
        new.append((parent, messages, ledger.request_hash(teacher.model, messages, params, 0)))
    report.parents_asked = len(new)

    engine = project.store.engine
    with engine.connect() as conn:
        answered = {h for (h,) in conn.execute(select(T.responses.c.request_hash).where(T.responses.c.role == ROLE))}
        intents = dict(conn.execute(select(ledger.INTENTS.c.request_hash, ledger.INTENTS.c.status)).all())
        unfinished = [r for r in conn.execute(select(REQUESTS).order_by(REQUESTS.c.id)) if r.request_hash not in answered]
    report.parents_resumed = len(unfinished)
    # (request id or None, parent, messages, hash): an unfinished request keeps its messages (and so its
    # k), redacted by today's settings (no change for one this code built); under changed messages,
    # model or params it is a different call, re-planned under its new hash.
    calls = [(r.id, r.parent_id, json.loads(r.messages), r.request_hash) for r in unfinished]
    calls = [(rid, p, redactor.messages(m), h) for rid, p, m, h in calls]
    calls = [(rid, p, m, h if json.loads(r.params) == params and r.model == teacher.model and m == json.loads(r.messages)
              else ledger.request_hash(teacher.model, m, params, 0)) for (rid, p, m, h), r in zip(calls, unfinished)]
    calls += [(None, p, m, h) for p, m, h in new]
    report.calls_total = len(calls)
    report.pii = redactor.summary()

    if dry_run:
        per_call = [call_cost(teacher, math.ceil(sum(len(x["content"]) for x in m) / 3), params["max_tokens"])
                    for _, _, m, _ in calls]
        report.projected_usd = sum(per_call)
        if verify:  # k label calls per parent, each at most the labeling engine's worst case
            label_calls = [call_cost(teacher, math.ceil(len(project.task.teacher_prompt(state.examples[p].input)) / 3),
                                     teacher.max_tokens) for _, p, _, _ in calls]
            report.projected_usd += k * cfg.labeling.samples * sum(label_calls)
        report.would_send = [{"parent_id": p, "request_hash": h, "messages": m, **params} for _, p, m, h in calls[:3]]
        report.by_label = _by_label(project)
        report.seconds = time.perf_counter() - started
        return report

    redactor.record(engine)
    with engine.begin() as conn:  # the requests are on record before anything is sent
        stamp = now()
        for rid, p, m, h in calls:
            values = {"request_hash": h, "model": teacher.model, "params": json.dumps(params, sort_keys=True),
                      "messages": json.dumps(m, ensure_ascii=False)}
            if rid is None:
                conn.execute(insert(REQUESTS).values(parent_id=p, k=k, prompt_version=PROMPT_VERSION,
                                                     created_at=stamp, **values))
            else:
                conn.execute(update(REQUESTS).where(REQUESTS.c.id == rid).values(**values))

    plan = Plan(teacher.model, params, [], [], [], answered, role=ROLE, decide=False)
    for _, parent, messages, h in calls:
        plan.items.append(Item(parent, [h], [Call(parent, 0, messages, h, sum(len(x["content"]) for x in messages))]))
        if h in intents:
            plan.has_intent.add(h)
            if intents[h] == "pending":
                plan.live_pending.add(h)
    inner = LabelReport("augment", teacher.model, resumed_in_flight=len(plan.live_pending), max_cost_usd=limit_usd)
    if plan.calls:
        from stillroom.backends.registry import teacher_backend

        asyncio.run(run_live(project, plan, teacher_backend(teacher, project.root), inner, Budget(limit_usd), progress))
    for name in ("calls_paid", "calls_failed", "calls_not_sent", "resumed_in_flight", "retries", "spent_usd",
                 "projected_usd", "stopped", "failures"):
        setattr(report, name, getattr(inner, name))

    _accept(project, "unverified" if verify else "kept", per_label_max, report)
    if verify:
        _verify(project, report, limit_usd, verify_progress)
    report.by_label = _by_label(project)
    report.seconds = time.perf_counter() - started
    return report
