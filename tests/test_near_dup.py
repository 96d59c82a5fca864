"""Near-duplicate dedupe where the 0.8 threshold matters: pairs above it by a margin are dropped, pairs far
below it and same-template-different-facts tickets are kept.

Every expected Jaccard is fixed by construction, never computed by ftops: the texts are one user message of
N distinct words; the dedupe normalises to "user: ..." (N + 1 words) and shingles 3 words, so a text has
S = N - 1 distinct shingles, and k substitutions of single words, at least 3 words apart and away from the
ends, remove 3k shingles and add 3k new ones: J = (S - 3k) / (S + 3k).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ftops.data.dedupe import History, dedupe
from ftops.data.records import Batch, Example

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import near_dup  # noqa: E402


def words(n: int, tag: str) -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


def substituted(ws: list[str], positions: list[int]) -> list[str]:
    out = list(ws)
    for p in positions:
        out[p] = f"changed{p}"
    return out


def msg(ws: list[str]) -> list[dict]:
    return [{"role": "user", "content": " ".join(ws)}]


# (N words, substituted positions, J by hand)
ABOVE = [  # S = 199
    (200, [100], 196 / 202),  # 0.970
    (200, [50, 150], 193 / 205),  # 0.941
    (200, [10], 196 / 202),
    (200, [190], 196 / 202),
    (200, [60, 120], 193 / 205),
]
FAR_BELOW = [  # S = 99, 12 substitutions 8 apart: (99 - 36) / (99 + 36) = 0.467
    (100, list(range(6, 96, 8))[:12], 63 / 135),
    (100, list(range(4, 100, 8))[:12], 63 / 135),
]
# same template, different facts (the issue's example and ticket-shaped ones): distinct customers' examples
HARD_NEGATIVES = [
    ("Your order #48213 ships to Leeds on 3 May.", "Your order #91544 ships to Bristol on 9 June."),
    (
        "Hi, my router stopped working after 12 days. Order #55120, delivered to York on 4 March. Replacement?",
        "Hi, my kettle stopped working after 40 days. Order #70233, delivered to Hull on 21 October. Replacement?",
    ),
    (
        "Invoice 40211 for 310 GBP was issued on 2 April; payment is due within 30 days.",
        "Invoice 88907 for 745 GBP was issued on 17 August; payment is due within 14 days.",
    ),
    (
        "Reset the password for account 7731 and send the link to the address on file, ticket AB-1042.",
        "Reset the password for account 2290 and send the link to the address on file, ticket KT-5519.",
    ),
]


def pair_batch(pairs: list[tuple[list[dict], list[dict]]]) -> list[bool]:
    """Dedupe all first texts, then all second texts (as two chunks of the data stage): dropped flag per second."""
    history = History()
    try:
        first, _, _ = dedupe(Batch(examples=[Example(p[0], "first", i) for i, p in enumerate(pairs)]), history)
        assert len(first.examples) == len(pairs)  # the firsts are distinct from each other
        second, _, _ = dedupe(Batch(examples=[Example(p[1], "second", i) for i, p in enumerate(pairs)]), history)
    finally:
        history.close()
    dropped = {q.line for q in second.quarantine if q.reason.startswith("duplicate_")}
    return [i in dropped for i in range(len(pairs))]


@pytest.mark.parametrize(("n", "positions", "j"), ABOVE + FAR_BELOW)
def test_the_bench_ground_truth_matches_the_hand_count(n, positions, j):
    base = words(n, "w")
    assert near_dup.jaccard(msg(base), msg(substituted(base, positions))) == pytest.approx(j)


def test_pairs_well_above_the_threshold_are_dropped():
    pairs = [
        (msg(words(n, f"t{k}w")), msg(substituted(words(n, f"t{k}w"), pos))) for k, (n, pos, _) in enumerate(ABOVE)
    ]
    assert pair_batch(pairs) == [True] * len(ABOVE)


def test_case_and_spacing_only_copies_are_dropped():
    a = [{"role": "user", "content": "Where is my parcel? It was due on Monday."}]
    b = [{"role": "user", "content": "  where IS my parcel?   it was due on monday. "}]
    assert pair_batch([(a, b)]) == [True]


def test_pairs_far_below_the_threshold_are_kept():
    pairs = [
        (msg(words(n, f"f{k}w")), msg(substituted(words(n, f"f{k}w"), pos))) for k, (n, pos, _) in enumerate(FAR_BELOW)
    ]
    assert pair_batch(pairs) == [False] * len(FAR_BELOW)


def test_same_template_different_facts_are_kept():
    answer = [{"role": "assistant", "content": "Thanks, we have logged this and will email you."}]
    pairs = [
        ([{"role": "user", "content": a}, *answer], [{"role": "user", "content": b}, *answer])
        for a, b in HARD_NEGATIVES
    ]
    assert pair_batch(pairs) == [False] * len(HARD_NEGATIVES)


def test_bench_scoring_matches_a_hand_count():
    """The bench's arithmetic on pairs whose band and flag are set by hand (texts are not read by `_score`)."""
    planted = [(None, None, 0.55), (None, None, 0.85), (None, None, 0.95), (None, None, 0.95)]
    negatives = [(None, None, 0.4), (None, None, 0.5)]
    s = near_dup._score(planted, negatives, [True, True, False, True], [True, False])
    bands = s["near_dup_bands"]
    assert bands["0.5-0.6"] == {"pairs": 1, "flagged_share": 1.0, "recall": None, "precision": 0.0}
    assert bands["0.8-0.9"]["recall"] == 1.0
    assert bands["0.9-1.0"] == {"pairs": 2, "flagged_share": 0.5, "recall": 0.5, "precision": 1.0}
    assert bands["0.6-0.7"]["pairs"] == 0 and bands["0.6-0.7"]["flagged_share"] is None
    assert s["hard_negative_false_positive_rate"] == 0.5
    # 3 pairs at J >= 0.8, 2 of them flagged; 4 flags in all, 2 of them right
    assert s["overall"] == {"recall": 0.6667, "precision": 0.5}


def test_bench_reports_every_band_and_the_baseline_at_its_best_setting():
    r = near_dup.evaluate(n_pairs=6, seed=3)
    for result in (r, r["baseline"], r["baseline_textdedup_5grams"]):
        assert set(result["near_dup_bands"]) == {"0.5-0.6", "0.6-0.7", "0.7-0.8", "0.8-0.9", "0.9-1.0"}
        assert all(b["pairs"] == 6 for b in result["near_dup_bands"].values())
        assert result["near_dup_bands"]["0.5-0.6"]["recall"] is None  # nothing to recall below the threshold
    assert r["near_dup_bands"]["0.5-0.6"]["flagged_share"] == 0.0  # ours keeps pairs far below the threshold
    assert r["near_dup_bands"]["0.9-1.0"]["recall"] >= 5 / 6
    # the baseline reported is the sweep's best, every setting on the bands' own shingling
    sweep = r["baseline_sweep"]
    assert len(sweep) == len(near_dup.BASELINE_SETTINGS)
    assert sweep[r["baseline"]["setting"]]["f1"] == max(v["f1"] for v in sweep.values())
    # ours is datasketch's LSH at 0.8 with confirmation: the same decisions on the same shingles
    assert sweep["lsh0.8+confirm"]["overall"] == r["near_dup_overall"]
