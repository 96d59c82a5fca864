"""Dedupe: exact (normalised content hash) and near duplicates (MinHash LSH, datasketch).

Checked within the batch AND against the customer's whole history of kept examples (each dataset
version stores its exact keys and MinHash signatures under `index/`), so an upload of last month's data
adds nothing. The first-seen example is kept; later copies are quarantined with `duplicate_exact` or
`duplicate_near` and the id of the example they duplicate.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from ftops.ingest import Batch, Example

NUM_PERM = 128
THRESHOLD = 0.8
SEED = 1  # MinHash permutation seed: part of the stored signatures format, never change
SCHEME = "affine32"  # datasketch 2 default; stored signatures are only comparable within one scheme
_WORD = re.compile(r"\w+")


def canonical_text(ex: Example) -> str:
    return "\n".join(f"{m['role']}: {' '.join(m['content'].casefold().split())}" for m in ex.messages)


def content_key(ex: Example) -> str:
    return hashlib.sha256(canonical_text(ex).encode()).hexdigest()


def shingles(ex: Example, n: int = 3) -> list[bytes]:
    words = _WORD.findall(canonical_text(ex))
    if len(words) < n:
        return [" ".join(words).encode()]
    return list({" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)})


def signatures(examples: list[Example]) -> np.ndarray:
    from datasketch import MinHash

    if not examples:
        return np.zeros((0, NUM_PERM), dtype=np.uint64)
    return np.stack(
        [
            m.hashvalues
            for m in MinHash.bulk([shingles(e) for e in examples], num_perm=NUM_PERM, seed=SEED, scheme=SCHEME)
        ]
    )


def _lean(sig: np.ndarray):
    """A read-only MinHash from stored hash values (skips recomputing the permutations)."""
    from datasketch import LeanMinHash

    return LeanMinHash(seed=SEED, hashvalues=sig, scheme=SCHEME)


class History:
    """Exact keys and MinHash signatures of every example the customer has kept so far."""

    def __init__(self, keys: list[str] | None = None, sigs: np.ndarray | None = None):
        from datasketch import MinHashLSH

        self.exact: dict[str, str] = {}
        self.lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
        self.sigs: dict[str, np.ndarray] = {}
        for key, sig in zip(keys or [], sigs if sigs is not None else [], strict=False):
            self.add(key, sig)

    def add(self, key: str, sig: np.ndarray) -> None:
        self.exact[key] = key
        if key not in self.sigs:
            self.sigs[key] = sig
            self.lsh.insert(key, _lean(sig))

    def near(self, sig: np.ndarray) -> str | None:
        for cand in self.lsh.query(_lean(sig)):
            if float(np.mean(self.sigs[cand] == sig)) >= THRESHOLD:
                return cand
        return None


def dedupe(batch: Batch, history: History) -> tuple[Batch, list[str], np.ndarray]:
    """Drop duplicates of history or of earlier batch examples; returns batch, kept keys, kept signatures."""
    sigs = signatures(batch.examples)
    kept, keys, kept_sigs = [], [], []
    for ex, sig in zip(batch.examples, sigs, strict=True):
        key = content_key(ex)
        if key in history.exact:
            batch.drop(ex, "duplicate_exact", f"same content as {key[:12]}")
            continue
        twin = history.near(sig)
        if twin is not None:
            batch.drop(ex, "duplicate_near", f"near duplicate of {twin[:12]}")
            continue
        history.add(key, sig)
        kept.append(ex)
        keys.append(key)
        kept_sigs.append(sig)
    batch.examples = kept
    return batch, keys, np.array(kept_sigs, dtype=np.uint64).reshape(-1, NUM_PERM)
