"""Slices by hand: class, length bucket, source and tag, with the gated flag and examples."""

from stillroom.evaluate.slices import SliceItem, compute_slices, length_bucket, worst_slices


def test_length_buckets_are_fixed_word_counts():
    assert length_bucket("one two three four five") == "0-5 words"
    assert length_bucket("w " * 6) == "6-10 words"
    assert length_bucket("w " * 20) == "11-20 words"
    assert length_bucket("w " * 21) == "21-50 words"
    assert length_bucket("w " * 51) == "51+ words"


def test_slices_by_hand():
    def item(i, ref, ok, source="web", tags=(), words=3):
        return SliceItem(i, " ".join(["w"] * words), ref, 1.0, 1.0 if ok else 0.0, source, list(tags),
                         {"teacher": ref, "student": ref if ok else "other"})

    items = ([item(i, "a", i < 3, tags=["vip"]) for i in range(4)]  # a: 3 of 4 right
             + [item(i, "b", True, "mail", words=8) for i in range(4, 10)])  # b: all right
    out = compute_slices(items, labels=["a", "b", "c"], min_examples=5)
    by = {(s["kind"], s["name"]): s for s in out["slices"]}
    assert by[("class", "a")]["gap_points"] == 25.0 and by[("class", "a")]["gated"] is False
    assert by[("class", "b")]["gap_points"] == 0.0 and by[("class", "b")]["gated"] is True
    assert by[("tag", "vip")]["n"] == 4 and by[("source", "web")]["n"] == 4 and by[("source", "mail")]["n"] == 6
    assert by[("length", "0-5 words")]["n"] == 4 and by[("length", "6-10 words")]["n"] == 6
    assert by[("class", "a")]["examples"] == [{"example_id": 3, "input": "w w w", "teacher": "a", "student": "other"}]
    assert out["slices"][0]["gap_points"] == 25.0  # worst first
    assert out["empty"] == [{"kind": "class", "name": "c",
                             "message": "class 'c' has no examples in this set: its quality is unmeasured"}]
    assert {s["name"] for s in worst_slices(out, k=10, gated_only=True)} == {"b", "mail", "6-10 words"}
    assert compute_slices([], ["a"])["empty"][-1]["message"].startswith("no scored examples")
