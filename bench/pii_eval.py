"""Recall and precision of PII detection (`ftops.data.clean.find_pii`) on the hand-labelled set
tests/data/pii_labelled.jsonl, next to the naive baseline of the source document (three regexes: SSN,
16-digit CARD, EMAIL) in the same run; and, apart from that tuning set, on the held-out set
tests/data/pii_heldout.jsonl (written after the detector was frozen, never tuned on) next to presidio-analyzer
out of the box (`blind`, `baseline_blind`).

    .venv/bin/python bench/pii_eval.py [--data tests/data/pii_labelled.jsonl] [--heldout ...] [--min-seconds 0.5]

Presidio runs offline: its predefined recognizers (regex + checksum + context words) on a blank spaCy English
pipeline, since no NER model can be downloaded here (NER only adds PERSON/LOCATION/ORG/..., none of our types);
default score threshold (0: every result counts); its entity names mapped to ours (PRESIDIO_TYPES), results of
other entities (URL, DATE_TIME, US_BANK_NUMBER, ...) ignored, for it and for nothing else. It has no recognizer
for secrets.

Scoring is at span level: a predicted span is a true positive when it has the labelled type and overlaps
the span of a labelled value (located with str.find); a labelled value is recalled when such a predicted
span exists. Figures are per type and overall (micro), plus "any_type" (overlap counts whatever the type).
Prints a table to stderr and one JSON line last on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "include"))

from ftops.data.clean import find_pii  # noqa: E402

DATA = ROOT / "tests" / "data" / "pii_labelled.jsonl"
HELDOUT = ROOT / "tests" / "data" / "pii_heldout.jsonl"
PRESIDIO_TYPES = {
    "EMAIL_ADDRESS": "EMAIL",
    "PHONE_NUMBER": "PHONE",
    "US_SSN": "SSN",
    "CREDIT_CARD": "CARD",
    "IBAN_CODE": "IBAN",
    "IP_ADDRESS": "IP",
}
TYPES = ("EMAIL", "PHONE", "SSN", "CARD", "IBAN", "IP", "SECRET")
NAIVE = [
    ("SSN", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("CARD", re.compile(r"\b\d{16}\b")),
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Z|a-z]{2,}\b")),
]

Span = tuple[str, int, int]
Detector = Callable[[str], Iterable[Span]]


def naive_find(text: str) -> list[Span]:
    """The source document's baseline: three independent regexes, no checksums, no overlap resolution."""
    return sorted(((kind, m.start(), m.end()) for kind, rx in NAIVE for m in rx.finditer(text)), key=lambda s: s[1])


def presidio_detector() -> Detector:
    """presidio-analyzer's AnalyzerEngine with its default recognizers, on a blank spaCy pipeline (offline)."""
    import tempfile

    import spacy
    import tldextract

    # presidio's email recognizer calls tldextract, which would try to download the suffix list; offline, use the
    # snapshot bundled with tldextract (what it falls back to after the download fails, minus the wait and noise)
    tldextract.extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    model = tempfile.mkdtemp(prefix="ftops-blank-en-")
    spacy.blank("en").to_disk(model)
    engine = AnalyzerEngine(
        nlp_engine=SpacyNlpEngine(models=[{"lang_code": "en", "model_name": model}]), supported_languages=["en"]
    )

    def detect(text: str) -> list[Span]:
        found = engine.analyze(text, language="en")
        return sorted(
            ((PRESIDIO_TYPES[r.entity_type], r.start, r.end) for r in found if r.entity_type in PRESIDIO_TYPES),
            key=lambda s: s[1],
        )

    return detect


def load(path: Path | str = DATA, split: str | None = None) -> list[tuple[str, list[Span]]]:
    """(text, labelled spans) per line, optionally of one split only; a repeated value takes its next occurrence;
    a value not in its text is an error."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        rec = json.loads(line)
        if split is not None and rec.get("split") != split:
            continue
        text, spans, seen = rec["text"], [], {}
        for item in rec["pii"]:
            start = text.find(item["value"], seen.get(item["value"], 0))
            if start < 0 or item["type"] not in TYPES:
                raise ValueError(f"{path}:{n}: bad label {item!r}")
            seen[item["value"]] = start + 1
            spans.append((item["type"], start, start + len(item["value"])))
        rows.append((text, spans))
    return rows


def _ratio(num: int, den: int) -> float:
    return round(num / den, 4) if den else 1.0


def _figures(tp_pred: int, pred: int, found: int, gold: int) -> dict:
    return {
        "recall": _ratio(found, gold),
        "precision": _ratio(tp_pred, pred),
        "found": found,
        "labelled": gold,
        "tp": tp_pred,
        "predicted": pred,
    }


def score(rows: list[tuple[str, list[Span]]], detect: Detector) -> dict:
    """Per type, overall (micro) and any-type recall/precision, plus the misses and false alarms for reading."""
    gold_n = dict.fromkeys(TYPES, 0)
    found_n = dict.fromkeys(TYPES, 0)
    pred_n = dict.fromkeys(TYPES, 0)
    tp_n = dict.fromkeys(TYPES, 0)
    any_found = any_tp = 0
    misses, false_alarms = [], []

    def overlap(a: Span, b: Span) -> bool:
        return a[1] < b[2] and b[1] < a[2]

    for text, gold in rows:
        pred = list(detect(text))
        for g in gold:
            gold_n[g[0]] += 1
            hit = [p for p in pred if overlap(p, g)]
            any_found += bool(hit)
            if any(p[0] == g[0] for p in hit):
                found_n[g[0]] += 1
            else:
                misses.append(
                    {"type": g[0], "value": text[g[1] : g[2]], "got": [(p[0], text[p[1] : p[2]]) for p in hit]}
                )
        for p in pred:
            pred_n[p[0]] = pred_n.get(p[0], 0) + 1
            hit = [g for g in gold if overlap(p, g)]
            any_tp += bool(hit)
            if any(g[0] == p[0] for g in hit):
                tp_n[p[0]] = tp_n.get(p[0], 0) + 1
            else:
                false_alarms.append({"type": p[0], "value": text[p[1] : p[2]], "text": text})

    per_type = {t: _figures(tp_n.get(t, 0), pred_n.get(t, 0), found_n[t], gold_n[t]) for t in TYPES}
    gold_total, pred_total = sum(gold_n.values()), sum(pred_n.values())
    return {
        "overall": _figures(sum(tp_n.values()), pred_total, sum(found_n.values()), gold_total),
        "any_type": _figures(any_tp, pred_total, any_found, gold_total),
        "per_type": per_type,
        "misses": misses,
        "false_alarms": false_alarms,
    }


def without(per_type: dict, left_out: str) -> dict:
    """Overall (micro) recall and precision over every type but `left_out`."""
    kept = [f for t, f in per_type.items() if t != left_out]
    return _figures(*(sum(f[k] for f in kept) for k in ("tp", "predicted", "found", "labelled")))


def throughput(texts: list[str], detect: Detector, min_seconds: float) -> float:
    """Texts per second over whole passes of the set, repeated for at least min_seconds."""
    n, start = 0, time.perf_counter()
    while True:
        for t in texts:
            detect(t)
        n += len(texts)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return round(n / elapsed, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--heldout", default=str(HELDOUT), help="held-out set, scored apart (never tuned on)")
    ap.add_argument("--min-seconds", type=float, default=0.5, help="time each detector for at least this long")
    args = ap.parse_args()
    rows = load(args.data)
    texts = [t for t, _ in rows]
    result = {
        "texts": len(rows),
        "labelled_spans": sum(len(g) for _, g in rows),
        "negative_texts": sum(1 for _, g in rows if not g),
    }
    splits = sorted({json.loads(line).get("split", "") for line in Path(args.data).read_text().splitlines() if line})
    for name, detect in (("ours", find_pii), ("naive", naive_find)):
        s = score(rows, detect)
        s["texts_per_s"] = throughput(texts, detect, args.min_seconds)
        s["splits"] = {sp: score(load(args.data, sp), detect)["overall"] for sp in splits if sp}
        result[name] = s
    held = load(args.heldout)
    for key, detect in (("blind", find_pii), ("baseline_blind", presidio_detector())):
        s = score(held, detect)
        o = s["overall"]
        result[key] = {
            "recall": o["recall"],
            "precision": o["precision"],
            "spans": o["labelled"],
            "per_type": s["per_type"],
            "texts": len(held),
            "negative_texts": sum(1 for _, g in held if not g),
            # presidio has no secret recognizer: the types both detectors cover, compared on equal terms
            "without_secret": without(s["per_type"], "SECRET"),
            "texts_per_s": throughput([t for t, _ in held], detect, args.min_seconds),
            "misses": s["misses"],
            "false_alarms": s["false_alarms"],
        }
    result["baseline_blind"]["detector"] = "presidio-analyzer, default recognizers, blank spaCy en (no NER)"

    err = sys.stderr
    print(
        f"{len(rows)} texts, {result['labelled_spans']} labelled spans, {result['negative_texts']} negatives", file=err
    )
    head = f"{'type':<8} {'n':>4} | {'ours R':>7} {'ours P':>7} | {'naive R':>7} {'naive P':>7}"
    print(head, "-" * len(head), sep="\n", file=err)
    for t in (*TYPES, "overall", "any_type"):
        o = result["ours"]["per_type"][t] if t in TYPES else result["ours"][t]
        b = result["naive"]["per_type"][t] if t in TYPES else result["naive"][t]
        print(
            f"{t:<8} {o['labelled']:>4} | {o['recall']:>7.3f} {o['precision']:>7.3f} | "
            f"{b['recall']:>7.3f} {b['precision']:>7.3f}",
            file=err,
        )
    for sp, o in result["ours"]["splits"].items():
        b = result["naive"]["splits"][sp]
        print(
            f"{sp:<8} {o['labelled']:>4} | {o['recall']:>7.3f} {o['precision']:>7.3f} | "
            f"{b['recall']:>7.3f} {b['precision']:>7.3f}   (overall, {sp} split only)",
            file=err,
        )
    print(f"texts/s: ours {result['ours']['texts_per_s']:,.0f}, naive {result['naive']['texts_per_s']:,.0f}", file=err)
    for m in result["ours"]["misses"]:
        print(f"  ours missed {m['type']}: {m['value']!r} got {m['got']}", file=err)
    for f in result["ours"]["false_alarms"]:
        print(f"  ours false alarm {f['type']}: {f['value']!r} in {f['text']!r}", file=err)

    print(f"held-out set {args.heldout}: {result['blind']['spans']} spans", file=err)
    for t in (*TYPES, "overall"):
        o = result["blind"]["per_type"][t] if t in TYPES else result["blind"]
        b = result["baseline_blind"]["per_type"][t] if t in TYPES else result["baseline_blind"]
        n = o["labelled"] if t in TYPES else o["spans"]
        print(
            f"{t:<8} {n:>4} | ours {o['recall']:.3f} {o['precision']:.3f} | presidio {b['recall']:.3f} "
            f"{b['precision']:.3f}",
            file=err,
        )
    o, b = result["blind"]["without_secret"], result["baseline_blind"]["without_secret"]
    print(
        f"{'no SECRET':<8} {o['labelled']:>4} | ours {o['recall']:.3f} {o['precision']:.3f} | presidio "
        f"{b['recall']:.3f} {b['precision']:.3f}",
        file=err,
    )
    for m in result["blind"]["misses"]:
        print(f"  blind: ours missed {m['type']}: {m['value']!r} got {m['got']}", file=err)
    for f in result["blind"]["false_alarms"]:
        print(f"  blind: ours false alarm {f['type']}: {f['value']!r} in {f['text']!r}", file=err)

    for name in (
        "ours",
        "naive",
        "blind",
        "baseline_blind",
    ):  # keep the JSON line to figures; misses were printed above
        result[name] = {k: v for k, v in result[name].items() if k not in ("misses", "false_alarms")} | {
            "misses": len(result[name]["misses"]),
            "false_alarms": len(result[name]["false_alarms"]),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
