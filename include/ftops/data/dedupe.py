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

from ftops.data.clean import quarantine
from ftops.data.records import Batch, Example

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


_MIX = np.array([(0x9E3779B97F4A7C15 * (2 * j + 1)) % 2**64 for j in range(ROWS)], dtype=np.uint64)


def band_hashes(sigs: np.ndarray) -> np.ndarray:
    """(n, BANDS) 64-bit hashes of each band of ROWS signature values (vectorised; collisions are harmless:
    every candidate is confirmed on the whole signature)."""
    sigs = np.asarray(sigs, dtype=np.uint64)
    if not len(sigs):
        return np.zeros((0, BANDS), dtype=np.int64)
    parts = sigs[:, : BANDS * ROWS].reshape(len(sigs), BANDS, ROWS)
    with np.errstate(over="ignore"):
        h = (parts * _MIX).sum(axis=2, dtype=np.uint64)
        h ^= np.arange(BANDS, dtype=np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    return h.view(np.int64)


class History:
    """Exact keys and MinHash signatures of every example the customer has kept so far.

    Disk-backed (a private SQLite file in a temporary folder, removed on `close`), so memory stays flat at
    millions of examples; looked up a chunk at a time (one join per chunk, not one query per example).
    Near duplicates are found as datasketch's MinHashLSH finds them (the same banding: `BANDS` x `ROWS` of
    the 128 permutations for a 0.8 threshold), then confirmed on the whole signature's estimated Jaccard.
    """

    def __init__(self, keys: list[str] | None = None, sigs: np.ndarray | None = None, cache_mb: int = 64):
        self._dir = tempfile.TemporaryDirectory(prefix="ftops-dedupe-")
        self.db = sqlite3.connect(os.path.join(self._dir.name, "history.db"), isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=MEMORY", f"cache_size=-{cache_mb * 1024}"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("BEGIN")  # one transaction for the file's life: nothing here must survive a crash
        self.db.execute("CREATE TABLE exact (k BLOB PRIMARY KEY) WITHOUT ROWID")
        self.db.execute("CREATE TABLE sig (i INTEGER PRIMARY KEY, k TEXT, s BLOB)")
        self.db.execute("CREATE TABLE band (h INTEGER, i INTEGER)")
        self.db.execute("CREATE INDEX band_h ON band (h)")
        self.db.execute("CREATE TEMP TABLE qk (k BLOB)")
        self.db.execute("CREATE TEMP TABLE qb (h INTEGER, row INTEGER)")
        self.n = 0
        if keys:
            self.extend(keys, sigs if sigs is not None else np.zeros((0, NUM_PERM), dtype=np.uint64))

    def __len__(self) -> int:
        return self.n

    def has(self, key: str) -> bool:
        return self.db.execute("SELECT 1 FROM exact WHERE k = ?", (bytes.fromhex(key),)).fetchone() is not None

    def add(self, key: str, sig: np.ndarray) -> None:
        self.extend([key], np.asarray(sig, dtype=np.uint64).reshape(1, NUM_PERM))

    def extend(self, keys, sigs: np.ndarray, chunk: int = 20_000) -> None:
        """Add examples known to be kept (an earlier version's index); repeated keys are ignored."""
        for start in range(0, len(keys), chunk):
            ks = list(keys[start : start + chunk])
            ss = np.asarray(sigs[start : start + chunk], dtype=np.uint64)
            self._insert(ks, ss, band_hashes(ss))

    def _insert(self, keys: list[str], sigs: np.ndarray, bands: np.ndarray) -> None:
        rows = []
        for key, sig, hs in zip(keys, sigs, bands.tolist(), strict=True):
            if self.db.execute("INSERT OR IGNORE INTO exact VALUES (?)", (bytes.fromhex(key),)).rowcount:
                self.n += 1
                rows.append((self.n, key, sig.astype(np.uint32).tobytes(), hs))
        self.db.executemany("INSERT INTO sig VALUES (?, ?, ?)", [r[:3] for r in rows])
        self.db.executemany("INSERT INTO band VALUES (?, ?)", [(h, r[0]) for r in rows for h in r[3]])

    def near(self, sig: np.ndarray) -> str | None:
        _, twin = self.check(["0" * 64], np.asarray(sig, dtype=np.uint64).reshape(1, NUM_PERM), add=False)[0]
        return twin

    def check(self, keys: list[str], sigs: np.ndarray, add: bool = True) -> list[tuple[str, str | None]]:
        """For each example in order: ("keep", None), ("exact", twin key) or ("near", twin key), against the
        history and the examples kept before it in this chunk; the kept ones join the history (`add`)."""
        bands = band_hashes(sigs)
        self.db.execute("DELETE FROM qk")
        self.db.executemany("INSERT INTO qk VALUES (?)", [(bytes.fromhex(k),) for k in keys])
        known = {r[0].hex() for r in self.db.execute("SELECT e.k FROM exact e JOIN qk ON qk.k = e.k")}
        self.db.execute("DELETE FROM qb")
        self.db.executemany("INSERT INTO qb VALUES (?, ?)", [(h, i) for i, hs in enumerate(bands.tolist()) for h in hs])
        cands: dict[int, dict[str, bytes]] = {}
        for row, key, blob in self.db.execute(
            "SELECT qb.row, s.k, s.s FROM qb JOIN band b ON b.h = qb.h JOIN sig s ON s.i = b.i"
        ):
            cands.setdefault(row, {})[key] = blob
        out: list[tuple[str, str | None]] = []
        seen: set[str] = set()
        local: dict[int, list[int]] = {}  # band hash -> rows kept earlier in this chunk
        mine32 = sigs.astype(np.uint32)
        kept: list[int] = []
        for i, key in enumerate(keys):
            if key in known or key in seen:
                out.append(("exact", key))
                continue
            twin = None
            for other, blob in cands.get(i, {}).items():
                if float(np.mean(np.frombuffer(blob, dtype=np.uint32) == mine32[i])) >= THRESHOLD:
                    twin = other
                    break
            if twin is None:
                for j in {j for h in bands[i].tolist() for j in local.get(h, ())}:
                    if float(np.mean(mine32[j] == mine32[i])) >= THRESHOLD:
                        twin = keys[j]
                        break
            if twin is not None:
                out.append(("near", twin))
                continue
            out.append(("keep", None))
            seen.add(key)
            kept.append(i)
            for h in bands[i].tolist():
                local.setdefault(h, []).append(i)
        if add and kept:
            self._insert([keys[i] for i in kept], sigs[kept], bands[kept])
        return out

    def close(self) -> None:
        self.db.close()
        self._dir.cleanup()


def dedupe(batch: Batch, history: History) -> tuple[Batch, list[str], np.ndarray]:
    """Drop duplicates of history or of earlier batch examples; returns batch, kept keys, kept signatures."""
    sigs = signatures(batch.examples)
    all_keys = [content_key(ex) for ex in batch.examples]
    kept, keys, kept_sigs = [], [], []
    for ex, key, sig, (verdict, twin) in zip(
        batch.examples, all_keys, sigs, history.check(all_keys, sigs), strict=True
    ):
        if verdict == "exact":
            quarantine(batch, ex, "duplicate_exact", f"same content as {twin[:12]}", redacted=True)
        elif verdict == "near":
            quarantine(batch, ex, "duplicate_near", f"near duplicate of {twin[:12]}", redacted=True)
        else:
            kept.append(ex)
            keys.append(key)
            kept_sigs.append(sig)
    batch.examples = kept
    return batch, keys, np.array(kept_sigs, dtype=np.uint64).reshape(-1, NUM_PERM)
