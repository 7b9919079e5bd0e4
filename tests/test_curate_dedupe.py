"""Near-duplicates with the real MiniLM encoder: eval leakage the exact/folded check misses,
clusters inside training, --apply, the embedding cache, and the blockwise search itself."""

import json

import numpy as np
import pytest
from sqlalchemy import select

from conftest import write_chat_jsonl
from stillroom.capture.importers import import_file
from stillroom.curate.dedupe import apply_dedupe, find_near_duplicates, pairs_above
from stillroom.curate.datasets import training_pairs
from stillroom.curate.lock import find_leaks, lock_eval
from stillroom.curate.review import review_queue
from stillroom.store import tables as T
from stillroom.store.records import split_assignments

EVAL = [
    ("How do I reset my online banking password?", "other"),
    ("Where is my parcel? It was due yesterday", "shipping"),
    ("Can I get an invoice for last month", "billing"),
]
TRAIN = [
    ("How can I reset my online-banking password please", "other"),  # ~0.98 to an eval input
    ("where is my parcel?? it was due yesterday.", "shipping"),  # ~0.99, not a folded copy
    ("HOW DO I  RESET MY ONLINE BANKING PASSWORD?", "other"),  # a folded copy: find_leaks sees it too
    ("I was charged twice for the same order", "billing"),
    ("I was charged twice for the same order.", "other"),  # a near-duplicate with another label
    ("What is the weather like tomorrow?", "other"),
    ("My card payment was declined at the supermarket", "billing"),
    ("The courier left my package at the wrong address", "shipping"),
]


@pytest.fixture
def project(make_project, db_url, tmp_path):
    project = make_project(extra=f"database: {{url: '{db_url}'}}\n")  # the embedding cache on each database
    write_chat_jsonl(tmp_path / "eval.jsonl", EVAL)
    write_chat_jsonl(tmp_path / "train.jsonl", TRAIN)
    import_file(project, tmp_path / "eval.jsonl", split="eval")
    lock_eval(project)
    import_file(project, tmp_path / "train.jsonl", split="train")
    return project


def ids_of(project, texts):
    with project.store.engine.connect() as conn:
        by_text = {r.input: r.id for r in conn.execute(select(T.examples.c.id, T.examples.c.input))}
    return [by_text[t] for t in texts]


def test_leakage_beyond_folded_copies_and_clusters(project):
    paraphrase, sloppy, folded, twice, twice_dot = ids_of(project, [t for t, _ in TRAIN[:5]])
    pw_eval, parcel_eval = ids_of(project, [EVAL[0][0], EVAL[1][0]])
    assert [l["example_id"] for l in find_leaks(project)] == [folded]  # the existing check sees one

    report = find_near_duplicates(project, threshold=0.95)
    assert report.leaking_training_ids() == sorted([paraphrase, sloppy, folded])
    assert report.eval_with_near_duplicate() == sorted([pw_eval, parcel_eval])
    assert {(p.a, p.b): p.exact for p in report.leaks}[(folded, pw_eval)] is True
    # Inside training: the charged-twice pair (and the three password inputs, near-copies of each other).
    assert [twice, twice_dot] in report.clusters
    assert report.conflicting == [[twice, twice_dot]]
    payload = report.as_dict()
    assert payload["leakage"]["eval_examples_with_near_duplicate"] == 2
    assert payload["leakage"]["examples"][0]["score"] >= 0.95
    json.dumps(payload)  # the CLI's --json shape

    strict = find_near_duplicates(project, threshold=0.995)
    assert strict.leaking_training_ids() == [folded] and not strict.within


def test_apply_excludes_records_and_flags(project):
    paraphrase, sloppy, folded, twice, twice_dot = ids_of(project, [t for t, _ in TRAIN[:5]])
    report = find_near_duplicates(project, threshold=0.95)
    result = apply_dedupe(project, report)
    assert result["by_reason"]["eval_near_duplicate"] == 3
    assert result["by_reason"]["train_near_duplicate"] == 1  # the later of the charged-twice pair
    assert result["flagged_for_review"] == 2
    with project.store.engine.connect() as conn:
        splits = split_assignments(conn)
        reasons = {r.example_id: (r.reason, json.loads(r.detail)) for r in conn.execute(T.TABLES["exclusions"].select())}
    assert all(splits[i] == "excluded" for i in (paraphrase, sloppy, folded, twice_dot)) and splits[twice] == "train"
    assert reasons[twice_dot] == ("train_near_duplicate", {"kept_example_id": twice, "cluster_size": 2, "threshold": 0.95})
    assert reasons[sloppy][0] == "eval_near_duplicate" and reasons[sloppy][1]["score"] >= 0.95
    train, _ = training_pairs(project)
    assert TRAIN[1][0] not in {t for t, _ in train} and TRAIN[3][0] in {t for t, _ in train}
    assert not find_leaks(project)
    again = find_near_duplicates(project, threshold=0.95)
    assert not again.leaks and not again.within
    assert again.embedded_now == 0 and again.from_cache == again.n_training + again.n_eval  # cached
    flagged = {i.example_id: i.why for i in review_queue(project)}
    assert any("near-duplicates" in w for w in flagged[twice])


def test_apply_can_keep_training_duplicates(project):
    twice, twice_dot = ids_of(project, [TRAIN[3][0], TRAIN[4][0]])
    result = apply_dedupe(project, find_near_duplicates(project, threshold=0.95), exclude_train_duplicates=False)
    assert result["by_reason"] == {"eval_near_duplicate": 3, "train_near_duplicate": 0}
    with project.store.engine.connect() as conn:
        splits = split_assignments(conn)
    assert splits[twice] == splits[twice_dot] == "train"


def test_blockwise_search_matches_brute_force():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(300, 16)).astype(np.float32)
    A[150] = A[10] + 0.01  # planted near-duplicates
    A[299] = A[3]
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    B = A[:120] + rng.normal(scale=0.05, size=(120, 16)).astype(np.float32)
    B /= np.linalg.norm(B, axis=1, keepdims=True)
    for same, other in ((True, A), (False, B)):
        S = A @ other.T
        want = {(i, j) for i, j in zip(*np.nonzero(S >= 0.9)) if not same or i < j}
        for block in (1000, 16 * 300, 1 << 24):  # many small blocks, uneven blocks, one block
            ii, jj, ss = pairs_above(A, other, 0.9, same=same, block_floats=block)
            assert set(zip(ii.tolist(), jj.tolist())) == want
            assert np.allclose(ss, S[ii, jj])
    assert (10, 150) in {(i, j) for i, j in zip(*pairs_above(A, A, 0.99, same=True)[:2])}


def test_a_cluster_keeps_a_member_that_does_not_leak(project, tmp_path):
    # At 0.97 this input is a near-duplicate of the paraphrase (0.975) but not of the eval input
    # (0.966): the paraphrase leaves as an eval near-copy, so this one must stay.
    later = "How can I reset my online-banking password please, I forgot it"
    write_chat_jsonl(tmp_path / "more.jsonl", [(later, "other")])
    import_file(project, tmp_path / "more.jsonl", split="train")
    paraphrase, kept = ids_of(project, [TRAIN[0][0], later])
    report = find_near_duplicates(project, threshold=0.97)
    assert paraphrase in report.leaking_training_ids() and kept not in report.leaking_training_ids()
    assert any(paraphrase in c and kept in c for c in report.clusters)
    apply_dedupe(project, report)
    with project.store.engine.connect() as conn:
        splits = split_assignments(conn)
    assert splits[kept] == "train" and splits[paraphrase] == "excluded"


def test_generation_clusters_conflict_only_when_the_answers_disagree(tmp_path):
    """Two wordings of one summary agree (task.agrees: ROUGE-L at the threshold); a different
    summary of a near-identical input is a conflict worth a reviewer's look."""
    from stillroom.project import Project, init_project

    root = tmp_path / "gen"
    init_project(root)
    (root / "stillroom.yaml").write_text("task:\n  name: summaries\n  type: generation\n", encoding="utf-8")
    rows = [
        ("I was charged twice for the same order", "The customer was billed twice for one order."),
        ("I was charged twice for the same order.", "Customer billed twice for one order"),
        ("Where is my parcel? It was due yesterday", "The parcel is a day late."),
        ("where is my parcel?? it was due yesterday.", "Asks to cancel a gym subscription."),
    ]
    write_chat_jsonl(tmp_path / "gen.jsonl", rows)
    project = Project.open(root)
    try:
        import_file(project, tmp_path / "gen.jsonl", split="train")
        twice, twice_dot, parcel, parcel_dot = ids_of(project, [t for t, _ in rows])
        report = find_near_duplicates(project, threshold=0.95)
        assert sorted(report.clusters) == [[twice, twice_dot], [parcel, parcel_dot]]
        assert report.conflicting == [[parcel, parcel_dot]]
    finally:
        project.close()
