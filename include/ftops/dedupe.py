"""Dedupe: exact (normalised content hash) and near duplicates (MinHash LSH, datasketch).

Checked within the batch AND against the customer's whole history of kept examples (each dataset
version stores its exact keys and MinHash signatures under `index/`), so an upload of last month's data
adds nothing. The first-seen example is kept; later copies are quarantined with `duplicate_exact` or
`duplicate_near` and the id of the example they duplicate.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import tempfile

import numpy as np

from ftops.records import Batch, Example

NUM_PERM = 128
THRESHOLD = 0.8
SEED = 1  # MinHash permutation seed: part of the stored signatures format, never change
SCHEME = "affine32"  # datasketch 2 default; stored signatures are only comparable within one scheme
BANDS, ROWS = 9, 13  # MinHashLSH(threshold=0.8, num_perm=128)'s optimal banding, as datasketch 2 computes it
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


class History:
    """Exact keys and MinHash signatures of every example the customer has kept so far.

    Disk-backed (a private SQLite file in a temporary folder, removed on `close` or at exit), so its memory
    stays flat at millions of examples. Near duplicates are found as datasketch's MinHashLSH finds them (the
    same bands: `BANDS` x `ROWS` of the 128 permutations for a 0.8 threshold), then confirmed on the full
    signature's estimated Jaccard similarity.
    """

    def __init__(self, keys: list[str] | None = None, sigs: np.ndarray | None = None, cache_mb: int = 64):
        self._dir = tempfile.TemporaryDirectory(prefix="ftops-dedupe-")
        self.db = sqlite3.connect(os.path.join(self._dir.name, "history.db"), isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", f"cache_size=-{cache_mb * 1024}"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("BEGIN")
        self.db.execute("CREATE TABLE exact (k BLOB PRIMARY KEY) WITHOUT ROWID")
        self.db.execute("CREATE TABLE sig (i INTEGER PRIMARY KEY, k TEXT, s BLOB)")
        self.db.execute("CREATE TABLE band (h INTEGER, i INTEGER)")
        self.db.execute("CREATE INDEX band_h ON band (h)")
        self.n = 0
        if keys:
            self.extend(keys, sigs if sigs is not None else np.zeros((0, NUM_PERM), dtype=np.uint64))

    def __len__(self) -> int:
        return self.n

    @staticmethod
    def _bands(sig: np.ndarray) -> list[int]:
        b = np.ascontiguousarray(sig, dtype=np.uint64).tobytes()
        w = ROWS * 8
        # hash() of bytes is salted per process: fine, the table lives and dies with this process
        return [hash((i, b[i * w : (i + 1) * w])) for i in range(BANDS)]

    def has(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM exact WHERE k = ?", (bytes.fromhex(key),)).fetchone() is not None

    def add(self, key: str, sig: np.ndarray) -> None:
        if self.db.execute("INSERT OR IGNORE INTO exact VALUES (?)", (bytes.fromhex(key),)).rowcount == 0:
            return
        self.n += 1
        self.db.execute("INSERT INTO sig VALUES (?, ?, ?)", (self.n, key, sig.astype(np.uint32).tobytes()))
        self.db.executemany("INSERT INTO band VALUES (?, ?)", [(h, self.n) for h in self._bands(sig)])

    def extend(self, keys, sigs: np.ndarray, chunk: int = 10_000) -> None:
        for start in range(0, len(keys), chunk):
            for key, sig in zip(keys[start : start + chunk], np.asarray(sigs[start : start + chunk]), strict=False):
                self.add(key, sig)

    def near(self, sig: np.ndarray) -> str | None:
        hs = self._bands(sig)
        rows = self.db.execute(
            f"SELECT DISTINCT s.k, s.s FROM band b JOIN sig s ON s.i = b.i WHERE b.h IN ({','.join('?' * BANDS)})", hs
        ).fetchall()
        mine = sig.astype(np.uint32)
        for key, blob in rows:
            if float(np.mean(np.frombuffer(blob, dtype=np.uint32) == mine)) >= THRESHOLD:
                return key
        return None

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()


def dedupe(batch: Batch, history: History) -> tuple[Batch, list[str], np.ndarray]:
    """Drop duplicates of history or of earlier batch examples; returns batch, kept keys, kept signatures."""
    sigs = signatures(batch.examples)
    kept, keys, kept_sigs = [], [], []
    for ex, sig in zip(batch.examples, sigs, strict=True):
        key = content_key(ex)
        if history.has(key):
            batch.drop(ex, "duplicate_exact", f"same content as {key[:12]}", redacted=True)
            continue
        twin = history.near(sig)
        if twin is not None:
            batch.drop(ex, "duplicate_near", f"near duplicate of {twin[:12]}", redacted=True)
            continue
        history.add(key, sig)
        kept.append(ex)
        keys.append(key)
        kept_sigs.append(sig)
    batch.examples = kept
    return batch, keys, np.array(kept_sigs, dtype=np.uint64).reshape(-1, NUM_PERM)
