"""Serving API keys: one or more per customer, plus one serving admin key.

A customer key reaches only that customer's model at vLLM (enforced by `ftops.release.serving_auth`, loaded into
vLLM with `--middleware`). Only a SHA-256 of each key is stored: keys are 256-bit random, so a fast hash
is as strong as a slow one here, and the middleware checks one per request. The store is a JSON file
(`$FTOPS_HOME/secrets/api_keys.json`, or `FTOPS_KEYS_FILE`), written atomically with mode 0600; vLLM
re-reads it when it changes (checked every few seconds), so new and revoked keys apply without a restart.
In production the file is a shared secret volume (a Kubernetes Secret mount is refreshed by the kubelet).

Scopes say which door a key opens: `inference` (vLLM), `files` and `jobs` (the customer API, `ftops.portal`).
A stored entry without `scopes` (every key made before scopes existed) means `inference` only, so old stores
keep working unchanged. A `Verifier` admits only keys holding its `scope` (default `inference`: what the vLLM
middleware builds), so a files-only key is refused by vLLM with no change there.

The admin key (reconciler, evaluation, operators) comes from `FTOPS_SERVING_ADMIN_KEY`, else from
`$FTOPS_HOME/secrets/serving_admin_key` (mode 0600), which `scripts/services.sh` creates when neither exists.

Standard library only: the vLLM venv imports this module without the platform's dependencies.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

PREFIX = "ftk"
ADMIN = "_admin"  # the admin's label in metrics; never a customer id (those start with [a-z0-9])
_KEY = re.compile(rf"^{PREFIX}_([0-9a-f]{{16}})_([A-Za-z0-9_-]{{43}})$")
_CUSTOMER = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
SCOPES = ("inference", "files", "jobs")
DEFAULT_SCOPES = ("inference",)


class KeyStoreError(ValueError):
    pass


def home() -> Path:
    return Path(os.environ.get("FTOPS_HOME") or Path(__file__).resolve().parents[3] / ".ftops").resolve()


def secrets_dir() -> Path:
    return home() / "secrets"


def store_path() -> Path:
    return Path(os.environ.get("FTOPS_KEYS_FILE") or secrets_dir() / "api_keys.json")


def admin_key_path() -> Path:
    return secrets_dir() / "serving_admin_key"


def admin_key() -> str | None:
    """The serving admin key: FTOPS_SERVING_ADMIN_KEY, else the secrets file; None when neither exists."""
    key = os.environ.get("FTOPS_SERVING_ADMIN_KEY", "").strip()
    if key:
        return key
    try:
        return admin_key_path().read_text().strip() or None
    except FileNotFoundError:
        return None


def auth_headers() -> dict[str, str]:
    """`Authorization` for the serving admin, or nothing when no key is configured (vLLM then answers 401)."""
    key = admin_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class KeyInfo:
    key_id: str
    customer: str
    created: str
    revoked: str | None = None
    scopes: tuple[str, ...] = DEFAULT_SCOPES

    def public(self) -> dict:
        return {
            "key_id": self.key_id,
            "customer": self.customer,
            "created": self.created,
            "revoked": self.revoked,
            "scopes": list(self.scopes),
        }


def entry_scopes(entry: dict) -> tuple[str, ...] | None:
    """A stored entry's scopes: absent means inference only (stores written before scopes); anything that is not
    a list of known scopes is None (unknown is not absent: such a key opens nothing)."""
    scopes = entry.get("scopes", list(DEFAULT_SCOPES))
    if not isinstance(scopes, list) or not scopes or not all(isinstance(x, str) and x in SCOPES for x in scopes):
        return None
    return tuple(x for x in SCOPES if x in scopes)


def check_scopes(scopes) -> tuple[str, ...]:
    unknown = [x for x in scopes if x not in SCOPES]
    if unknown or not scopes:
        raise KeyStoreError(f"scopes must be some of {', '.join(SCOPES)}; got {', '.join(scopes) or 'none'}")
    return tuple(x for x in SCOPES if x in scopes)


def _read(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {"keys": {}}
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), dict):
        raise KeyStoreError(f"{path}: not a key store")
    return doc


@contextlib.contextmanager
def _locked(path: Path):
    """Serialise writers (two operators creating keys at once must not lose one)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _write(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: the middleware never reads half a file


def create(customer: str, path: Path | None = None, scopes=DEFAULT_SCOPES) -> tuple[KeyInfo, str]:
    """A new key for `customer` opening `scopes`; the key itself is returned once and never stored."""
    if not _CUSTOMER.match(customer):
        raise KeyStoreError(f"invalid customer id {customer!r}")
    scopes = check_scopes(list(scopes))
    path = path or store_path()
    key_id = secrets.token_hex(8)
    key = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    info = KeyInfo(key_id=key_id, customer=customer, created=_now(), scopes=scopes)
    with _locked(path):
        doc = _read(path)
        doc["keys"][key_id] = {
            "customer": customer,
            "sha256": digest(key),
            "created": info.created,
            "revoked": None,
            "scopes": list(scopes),
        }
        _write(path, doc)
    return info, key


def list_keys(customer: str | None = None, path: Path | None = None) -> list[KeyInfo]:
    doc = _read(path or store_path())
    out = [
        KeyInfo(
            key_id=k,
            customer=v["customer"],
            created=v.get("created", ""),
            revoked=v.get("revoked"),
            scopes=entry_scopes(v) or (),
        )
        for k, v in doc["keys"].items()
    ]
    return sorted((k for k in out if customer is None or k.customer == customer), key=lambda k: k.created)


def revoke(key_id: str, path: Path | None = None) -> KeyInfo:
    path = path or store_path()
    with _locked(path):
        doc = _read(path)
        entry = doc["keys"].get(key_id)
        if entry is None:
            raise KeyStoreError(f"no key {key_id!r}")
        entry["revoked"] = entry.get("revoked") or _now()
        _write(path, doc)
    return KeyInfo(
        key_id=key_id,
        customer=entry["customer"],
        created=entry.get("created", ""),
        revoked=entry["revoked"],
        scopes=entry_scopes(entry) or (),
    )


class Verifier:
    """Key -> customer for the middleware: reloads the store when its file changes (mtime/size/inode),
    checked at most every `recheck_s` seconds, so the cost per request is one comparison of hashes.

    Only keys holding `scope` are admitted (default `inference`, the vLLM door); `scope=None` admits every
    valid key and `lookup` then says which scopes it holds (the customer API checks them per route)."""

    def __init__(self, path: Path | None = None, recheck_s: float = 2.0, scope: str | None = "inference"):
        self.path = path or store_path()
        self.recheck_s = recheck_s
        self.scope = scope
        self._stamp: tuple | None = None
        self._checked = 0.0
        # key_id -> (sha256, customer, scopes); revoked ones, and ones without `scope`, left out
        self._by_id: dict[str, tuple[str, str, tuple[str, ...]]] = {}

    def _reload(self, now: float) -> None:
        self._checked = now
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return
        try:
            doc = _read(self.path)
        except (OSError, ValueError):
            # A store that cannot be read admits no customer key (fail closed); the admin key still works.
            self._by_id, self._stamp = {}, None
            return
        by_id = {}
        for k, v in doc["keys"].items():
            if not isinstance(v, dict) or v.get("revoked") or not isinstance(v.get("sha256"), str):
                continue
            scopes = entry_scopes(v)
            if not isinstance(v.get("customer"), str) or not _CUSTOMER.match(v["customer"]) or not scopes:
                continue
            if self.scope is None or self.scope in scopes:
                by_id[k] = (v["sha256"], v["customer"], scopes)
        self._by_id = by_id
        self._stamp = stamp

    def customer(self, key: str, now: float) -> str | None:
        found = self.lookup(key, now)
        return found[0] if found else None

    def lookup(self, key: str, now: float) -> tuple[str, tuple[str, ...]] | None:
        """(customer, scopes) of a valid key admitted by this verifier, else None."""
        if now - self._checked >= self.recheck_s:
            self._reload(now)
        m = _KEY.match(key)
        if not m:
            return None
        entry = self._by_id.get(m[1])
        if entry is None and now - self._checked >= 0.25:
            self._reload(now)  # a key made a moment ago works at once (a miss costs one stat(), rate-limited)
            entry = self._by_id.get(m[1])
        if entry is None or not hmac.compare_digest(entry[0], digest(key)):
            return None
        return entry[1], entry[2]
