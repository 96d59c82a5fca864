"""Near-duplicate detection measured where the 0.8 threshold is exercised: planted pairs across a Jaccard
range, plus hard negatives (same template, different facts), scored for the project's dedupe
(`ftops.data.dedupe.dedupe`, the public function the data stage calls) and, in the same run, for `datasketch`
used plainly as a user would (MinHash num_perm=128 + MinHashLSH threshold 0.8, query-then-insert).

    .venv/bin/python bench/near_dup.py [--pairs 200] [--seed 0]

Ground truth is computed here, independently of ftops code: the true Jaccard of a pair is the exact set
Jaccard of word 3-shingles of the text normalised as `include/ftops/data/dedupe.py` documents it (each message
as "role: content", content casefolded and whitespace-collapsed, messages joined by newlines; words are
`\\w+` runs; shingles are 3 consecutive words, as a set). Each pair is placed in its band by that value:
bands 0.5-0.6, 0.6-0.7, 0.7-0.8, 0.8-0.9, 0.9-1.0 (lower bound inclusive, 1.0 falls in 0.9-1.0).

Definitions (per band, for each detector):
- `flagged_share`: share of the band's pairs whose second text is dropped as a duplicate of the first.
- `recall`: for bands at or above the threshold (0.8-0.9, 0.9-1.0) it is `flagged_share` (every pair there
  is a true near duplicate); for bands below the threshold there is nothing to recall, so it is None and
  `flagged_share` is the false-positive rate of that band.
- `precision`: of the band's flagged pairs, the share whose true Jaccard is >= the threshold (1.0 above the
  threshold, 0.0 below it when anything is flagged, None when nothing is). The informative precision is
  `overall.precision`: over every planted pair and hard negative, flagged pairs with true J >= threshold
  divided by all flagged pairs (it depends on the mix: `pairs` per band and the hard negatives below).
- `hard_negative_false_positive_rate`: share of hard-negative pairs (true J reported, most far below 0.8)
  whose second text is dropped. Hard negatives whose true J happens to reach 0.8 are counted in
  `hard_negatives.at_or_above_threshold`: any 0.8-Jaccard dedupe drops those by design.
- `one_fact_negatives_dropped`: the harder case, `pairs` texts of the same templates where ONE fact differs
  (an order number, a date): the share dropped, split by whether the true Jaccard is below the threshold
  (a dedupe error) or at/above it (by design of a 0.8 Jaccard dedupe, yet a customer's distinct example).

Baselines, all datasketch 2 MinHash(num_perm=128) + MinHashLSH, query-then-insert:
- `baseline`: the baseline at its best setting. It uses the same word 3-shingles that define the bands (any
  other shingling measures a different Jaccard than the one the bands are drawn on), and the best of
  `BASELINE_SETTINGS` by F1 of its overall recall/precision: the LSH threshold (0.7 ... 0.9), with or without
  confirming an LSH candidate by MinHash's estimated Jaccard >= 0.8. Every setting's overall figures are in
  `baseline_sweep`. Ours runs at its one setting (threshold 0.8, candidates confirmed), as the data stage does.
- `baseline_textdedup_5grams`: text-dedup's MinHash defaults (lowercase, split on `[^A-Za-z_0-9]`, word
  5-grams), LSH threshold 0.8, a candidate is a duplicate: a different Jaccard than the bands', so it misses
  the 0.8-0.9 band by construction; kept for reference only.
Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "include"))

THRESHOLD = 0.8  # the documented threshold of ftops.data.dedupe (checked against its THRESHOLD)
BANDS = ((0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0))
_WORD = re.compile(r"\w+")
_TD_SPLIT = re.compile(r"[^A-Za-z_0-9]")  # text-dedup's NON_ALPHA

_VOCAB = (
    "account access address adapter agent alert answer app archive area backup balance bank batch bill booking "
    "branch browser budget bug cable cache call card cart case change channel charge chat check client cloud code "
    "config contract copy cost coupon credit customer dashboard data date deal delay delivery device discount "
    "document domain driver email error event export fee file filter firmware form gateway guide hardware help "
    "history host image import incident invoice issue item key label laptop layout license limit link list login "
    "manager message meter mobile model monitor network note notice offer order package page panel parcel "
    "partner password payment plan policy port price printer process product profile quote rate receipt record "
    "refund region release report request reset router schedule screen search server service session setting "
    "shipment signal site size software speed storage store subscription support survey system tablet task team "
    "ticket token tracking transfer update upgrade upload user version voucher warranty window workflow zone "
    "the a my your our this that please kindly we you they it is was will can could should would not never always "
    "again still already now today yesterday tomorrow soon later after before during since because but and or "
    "so if when while although cannot did does has have had been being get got make made send sent see saw "
    "need want try tried fix fixed open opened close closed keep kept show shown work works worked stop stopped"
).split()


def normalise(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}: {' '.join(m['content'].casefold().split())}" for m in messages)


def shingle_set(messages: list[dict], n: int = 3) -> set[str]:
    words = _WORD.findall(normalise(messages))
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: list[dict], b: list[dict]) -> float:
    sa, sb = shingle_set(a), shingle_set(b)
    return len(sa & sb) / len(sa | sb)


def _msgs(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(_VOCAB) for _ in range(n)]


def _text(words: list[str], rng: random.Random) -> str:
    # sentences with capitals and punctuation: normalisation must not matter, only words do
    out, i = [], 0
    while i < len(words):
        k = rng.randint(6, 14)
        s = " ".join(words[i : i + k])
        out.append(s[:1].upper() + s[1:] + rng.choice(".?!"))
        i += k
    return " ".join(out)


def _plant(rng: random.Random, lo: float, hi: float) -> tuple[list[dict], list[dict], float]:
    """A pair whose true Jaccard lies in [lo, hi): a random support exchange, then word edits (substitute,
    insert, delete) applied to a copy until the Jaccard first drops below a target drawn from the band."""
    while True:
        q, a = _words(rng, rng.randint(40, 90)), _words(rng, rng.randint(60, 140))
        first = _msgs(_text(q, rng), _text(a, rng))
        q2, a2 = list(q), list(a)
        target = rng.uniform(lo, hi)
        if hi >= 1.0 and rng.random() < 0.1:  # some verbatim-by-words copies (J = 1.0: case/punctuation only)
            return first, _msgs(_text(q2, rng), _text(a2, rng)), 1.0
        second, j = first, 1.0
        for _ in range(400):
            side = q2 if rng.random() < len(q2) / (len(q2) + len(a2)) else a2
            op, pos = rng.random(), rng.randrange(len(side))
            if op < 0.6:
                side[pos] = rng.choice(_VOCAB)
            elif op < 0.8:
                side.insert(pos, rng.choice(_VOCAB))
            elif len(side) > 10:
                del side[pos]
            cand = _msgs(_text(q2, rng), _text(a2, rng))
            jc = jaccard(first, cand)
            if jc < target:
                second, j = cand, jc
                break
        if lo <= j < hi or (hi >= 1.0 and j == 1.0):
            return first, second, j


_CITIES = "Leeds Bristol Glasgow Cardiff Leicester Norwich Dundee Exeter York Bath Derby Hull Oxford Cambridge".split()
_MONTHS = "January February March April May June July August September October November December".split()
_ITEMS = "router laptop kettle headset monitor keyboard printer charger tablet speaker camera blender".split()
_NAMES = "Alice Bilal Chen Dana Emeka Farah Gustavo Hana Ivan Jonas Kemi Lars Mei Nadia Omar Priya".split()

_TEMPLATES = (
    "Your order #{n5} ships to {city} on {d} {month}. Track it with code {code}.",
    "Hi, my {item} stopped working after {n2} days. Order #{n5}, delivered to {city} on {d} {month}. "
    "Can I get a replacement?",
    "Hello {name}, thanks for contacting support. Your ticket {code} about the {item} has been escalated and "
    "a technician will call you on {d} {month} between {h}:00 and {h2}:00. Please keep the device powered on "
    "and connected to the network so we can run remote diagnostics before the visit.",
    "Invoice {n5} for {n3} GBP was issued on {d} {month}; payment is due within {n2} days. If you already paid, "
    "reply with the transfer reference and our billing team in {city} will reconcile it. Late payments incur "
    "a fee of {n2} GBP per month as described in section {n2} of your contract.",
    "I returned the {item} (RMA {code}) to the {city} depot on {d} {month} but the refund of {n3} EUR has not "
    "arrived yet. The courier confirmed delivery with tracking number {n5}{n5}. Could you check the status?",
    "Dear {name}, your subscription plan changes from Basic to Pro on {d} {month}. The new monthly price is "
    "{n2}.99 and includes {n3} GB of storage, priority support and access to the {city} data centre. No action "
    "is needed; you can cancel any time from the account page before the renewal date.",
    "The {item} firmware {n2}.{n2}.{n3} fails to install on unit {code}: error {n3} at step {n2}. We are in {city} "
    "and the update window is {d} {month} at {h}:00. What should we try first?",
)


def _facts(rng: random.Random) -> dict:
    return {
        "n5": rng.randint(10000, 99999),
        "n3": rng.randint(100, 999),
        "n2": rng.randint(2, 60),
        "city": rng.choice(_CITIES),
        "month": rng.choice(_MONTHS),
        "d": rng.randint(1, 28),
        "h": rng.randint(8, 12),
        "h2": rng.randint(13, 18),
        "item": rng.choice(_ITEMS),
        "name": rng.choice(_NAMES),
        "code": f"{rng.choice('ABCDEFGHJK')}{rng.choice('LMNPQRSTUV')}-{rng.randint(1000, 9999)}",
    }


def _hard_negative(rng: random.Random, one_fact: bool = False) -> tuple[list[dict], list[dict], float]:
    """Same template, different facts: every slot redrawn, or (`one_fact`) only one slot the template uses."""
    t = rng.choice(_TEMPLATES)
    answer = "Thank you, we have recorded your request and will update you by email."
    while True:
        a, b = _facts(rng), _facts(rng)
        if one_fact:
            used = sorted(set(re.findall(r"{(\w+)}", t)))
            b = a | {k: v for k, v in b.items() if k == rng.choice(used)}
        first, second = _msgs(t.format(**a), answer), _msgs(t.format(**b), answer)
        if normalise(first) != normalise(second):
            return first, second, jaccard(first, second)


# --- detectors: each takes the list of pairs and returns, per pair, whether the second text was flagged ---


def _ours(pairs: list[tuple[list[dict], list[dict], float]]) -> list[bool]:
    from ftops.data.dedupe import History, dedupe
    from ftops.data.records import Batch, Example

    firsts = [Example(messages=p[0], source="first", line=i) for i, p in enumerate(pairs)]
    seconds = [Example(messages=p[1], source="second", line=i) for i, p in enumerate(pairs)]
    flagged = [False] * len(pairs)
    history = History()
    try:
        # firsts then seconds, two chunks: the history check is what the data stage runs across chunks
        dedupe(Batch(examples=firsts), history)
        batch, _, _ = dedupe(Batch(examples=seconds), history)
    finally:
        history.close()
    for q in batch.quarantine:
        if q.source == "second" and q.reason in ("duplicate_near", "duplicate_exact"):
            flagged[q.line] = True
    return flagged


def _textdedup_tokens(messages: list[dict], n: int = 5) -> set[bytes]:
    words = [w for w in _TD_SPLIT.split("\n".join(m["content"] for m in messages).lower()) if w]
    if len(words) < n:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


# (LSH threshold, confirm a candidate by the estimated Jaccard >= THRESHOLD)
BASELINE_SETTINGS = tuple((t, c) for t in (0.7, 0.75, 0.8, 0.85, 0.9) for c in (False, True))


def _datasketch(pairs, tokens, lsh_threshold: float = THRESHOLD, confirm: bool = False) -> list[bool]:
    from datasketch import MinHash, MinHashLSH

    def sketch(msgs):
        m = MinHash(num_perm=128)
        m.update_batch(list(tokens(msgs)))
        return m

    lsh, kept = MinHashLSH(threshold=lsh_threshold, num_perm=128), {}
    for i, p in enumerate(pairs):
        kept[f"first-{i}"] = sketch(p[0])
        lsh.insert(f"first-{i}", kept[f"first-{i}"])
    flagged = []
    for i, p in enumerate(pairs):
        m = sketch(p[1])
        found = lsh.query(m)
        hit = any(m.jaccard(kept[k]) >= THRESHOLD for k in found) if confirm else bool(found)
        flagged.append(hit)
        if not hit:
            kept[f"second-{i}"] = m
            lsh.insert(f"second-{i}", m)
    return flagged


def _ours_shingles(messages: list[dict]) -> set[bytes]:
    return {s.encode() for s in shingle_set(messages)}


def _f1(overall: dict) -> float:
    r, p = overall["recall"] or 0.0, overall["precision"] or 0.0
    return 2 * r * p / (r + p) if r + p else 0.0


def _band_of(j: float) -> str | None:
    for lo, hi in BANDS:
        if lo <= j < hi or (hi == 1.0 and j == 1.0):
            return f"{lo:.1f}-{hi:.1f}"
    return None


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _score(planted, negatives, flags_planted, flags_neg) -> dict:
    bands = {}
    for lo, hi in BANDS:
        name = f"{lo:.1f}-{hi:.1f}"
        idx = [i for i, p in enumerate(planted) if _band_of(p[2]) == name]
        hit = [i for i in idx if flags_planted[i]]
        true_hit = [i for i in hit if planted[i][2] >= THRESHOLD]
        share = _ratio(len(hit), len(idx))
        bands[name] = {
            "pairs": len(idx),
            "flagged_share": share,
            "recall": share if lo >= THRESHOLD else None,
            "precision": _ratio(len(true_hit), len(hit)),
        }
    every = list(planted) + list(negatives)
    flags = list(flags_planted) + list(flags_neg)
    pos = [i for i, p in enumerate(every) if p[2] >= THRESHOLD]
    hits = [i for i, f in enumerate(flags) if f]
    tp = [i for i in hits if every[i][2] >= THRESHOLD]
    return {
        "near_dup_bands": bands,
        "hard_negative_false_positive_rate": _ratio(sum(flags_neg), len(negatives)),
        "overall": {"recall": _ratio(len(tp), len(pos)), "precision": _ratio(len(tp), len(hits))},
    }


def _spread(js: list[float]) -> dict:
    """How similar a sorted list of negative pairs really is, and how many reach the threshold."""
    return {
        "pairs": len(js),
        "jaccard_min": round(js[0], 4),
        "jaccard_median": round(js[len(js) // 2], 4),
        "jaccard_max": round(js[-1], 4),
        "at_or_above_threshold": sum(j >= THRESHOLD for j in js),
    }


def evaluate(n_pairs: int = 200, seed: int = 0) -> dict:
    """Plant `n_pairs` pairs per Jaccard band and 2 * `n_pairs` hard negatives; score ours and the datasketch
    baselines on them (see the module docstring for the definitions). Keys: `near_dup_bands`,
    `hard_negative_false_positive_rate`, `near_dup_overall`, `hard_negatives`, `baseline` (same keys as ours),
    `baseline_3shingles`."""
    from ftops.data import dedupe as ours_mod

    if ours_mod.THRESHOLD != THRESHOLD:  # the bands are drawn around the documented threshold
        raise RuntimeError(f"ftops.data.dedupe.THRESHOLD is {ours_mod.THRESHOLD}, bench assumes {THRESHOLD}")
    rng = random.Random(seed)
    planted = [_plant(rng, lo, hi) for lo, hi in BANDS for _ in range(n_pairs)]
    negatives = [_hard_negative(rng) for _ in range(2 * n_pairs)]
    one_fact = [_hard_negative(rng, one_fact=True) for _ in range(n_pairs)]
    allp = planted + negatives + one_fact
    neg_j = sorted(p[2] for p in negatives)

    def run(flags: list[bool]) -> dict:
        n, k = len(planted), len(planted) + len(negatives)
        s = _score(planted, negatives, flags[:n], flags[n:k])
        of = flags[k:]
        return {
            "near_dup_bands": s["near_dup_bands"],
            "hard_negative_false_positive_rate": s["hard_negative_false_positive_rate"],
            "near_dup_overall": s["overall"],
            "one_fact_negatives_dropped": {
                "below_threshold": _ratio(
                    sum(f for f, p in zip(of, one_fact, strict=True) if p[2] < THRESHOLD),
                    sum(p[2] < THRESHOLD for p in one_fact),
                ),
                "at_or_above_threshold": _ratio(
                    sum(f for f, p in zip(of, one_fact, strict=True) if p[2] >= THRESHOLD),
                    sum(p[2] >= THRESHOLD for p in one_fact),
                ),
            },
        }

    result = run(_ours(allp))
    result["hard_negatives"] = _spread(neg_j)
    result["one_fact_negatives"] = _spread(sorted(p[2] for p in one_fact))
    sweep = {}
    for t, confirm in BASELINE_SETTINGS:
        r = run(_datasketch(allp, _ours_shingles, t, confirm))
        sweep[f"lsh{t}" + ("+confirm" if confirm else "")] = r | {"lsh_threshold": t, "confirm": confirm}
    best = max(sweep, key=lambda k: _f1(sweep[k]["near_dup_overall"]))
    result["baseline"] = sweep[best] | {
        "setting": best,
        "method": f"datasketch 2 MinHash(num_perm=128) + MinHashLSH(threshold={sweep[best]['lsh_threshold']}) over "
        "the bands' word 3-shingles"
        + (", candidate confirmed by estimated Jaccard >= 0.8" if sweep[best]["confirm"] else ", candidate = duplicate")
        + ": the best setting of the sweep by overall F1",
    }
    result["baseline_sweep"] = {
        k: {
            "overall": v["near_dup_overall"],
            "f1": round(_f1(v["near_dup_overall"]), 4),
            "recall_0.8-0.9": v["near_dup_bands"]["0.8-0.9"]["recall"],
            "flagged_0.7-0.8": v["near_dup_bands"]["0.7-0.8"]["flagged_share"],
            "hard_negative_false_positive_rate": v["hard_negative_false_positive_rate"],
        }
        for k, v in sweep.items()
    }
    result["baseline_textdedup_5grams"] = run(_datasketch(allp, _textdedup_tokens)) | {
        "method": "datasketch 2 MinHash(num_perm=128) + MinHashLSH(threshold=0.8), text-dedup default tokens "
        "(lowercase, [^A-Za-z_0-9] split, word 5-grams), LSH candidate = duplicate: another Jaccard than the bands'"
    }
    result["near_dup_f1"] = round(_f1(result["near_dup_overall"]), 4)
    result["near_dup_setup"] = {"pairs_per_band": n_pairs, "seed": seed, "threshold": THRESHOLD, "shingle": 3}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=200, help="planted pairs per band")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    r = evaluate(args.pairs, args.seed)
    err = sys.stderr
    b3, b5 = r["baseline"], r["baseline_textdedup_5grams"]
    print(f"baseline at its best setting: {b3['setting']}", file=err)
    print(f"{'band':<8} {'n':>4} | {'ours flag':>9} | {'best flag':>9} | {'dsk5 flag':>9}", file=err)
    for band, o in r["near_dup_bands"].items():
        b, c = b3["near_dup_bands"][band], b5["near_dup_bands"][band]
        print(
            f"{band:<8} {o['pairs']:>4} | {o['flagged_share']:>9} | {b['flagged_share']:>9} | {c['flagged_share']:>9}",
            file=err,
        )
    print(
        f"hard negatives {r['hard_negatives']}: FP ours {r['hard_negative_false_positive_rate']}, "
        f"best {b3['hard_negative_false_positive_rate']}, dsk5 {b5['hard_negative_false_positive_rate']}",
        file=err,
    )
    for k, v in r["baseline_sweep"].items():
        print(f"  sweep {k:<16} F1 {v['f1']:.3f} {v['overall']}", file=err)
    print(f"ours F1 {r['near_dup_f1']:.3f} {r['near_dup_overall']}", file=err)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
