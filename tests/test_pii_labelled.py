"""PII detection on the hand-labelled set (tests/data/pii_labelled.jsonl), scored by bench/pii_eval.py."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from pii_eval import TYPES, load, naive_find, score  # noqa: E402

from ftops.clean import _iban, _luhn, find_pii  # noqa: E402


@pytest.fixture(scope="module")
def rows():
    return load()


@pytest.fixture(scope="module")
def ours(rows):
    return score(rows, find_pii)


def test_labelled_set_is_sizeable_and_mostly_hard_negatives(rows):
    assert len(rows) >= 150
    assert sum(1 for _, gold in rows if not gold) >= 0.4 * len(rows)
    assert {kind for _, gold in rows for kind, _, _ in gold} == set(TYPES)


def test_labelled_cards_and_ibans_carry_valid_checksums(rows):
    for text, gold in rows:
        for kind, start, end in gold:
            value = text[start:end]
            if kind == "CARD":
                assert _luhn(re.sub(r"\D", "", value)), value
            if kind == "IBAN":
                assert _iban(re.fullmatch(r".+", value)), value


def test_overall_recall_and_precision(ours):
    overall = ours["overall"]
    assert overall["recall"] >= 0.95, ours["misses"]
    assert overall["precision"] >= 0.95, ours["false_alarms"]


@pytest.mark.parametrize("kind", TYPES)
def test_every_type_is_recalled(ours, kind):
    assert ours["per_type"][kind]["recall"] >= 0.9, [m for m in ours["misses"] if m["type"] == kind]


def test_naive_baseline_recalls_less(rows, ours):
    naive = score(rows, naive_find)
    assert naive["overall"]["recall"] < ours["overall"]["recall"]
    assert naive["any_type"]["recall"] < ours["any_type"]["recall"]
