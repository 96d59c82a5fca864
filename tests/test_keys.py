"""The serving key store (ftops.release.keys) and the `ftops keys` command, without a server: what is stored, what a
key unlocks, and that anything unreadable admits nobody."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, TEST_CUSTOMERS
from ftops.release import keys


def test_store_keeps_hashes_only_and_revocation_applies_on_the_next_check(tmp_path):
    store = tmp_path / "secrets" / "api_keys.json"
    info, key = keys.create("brightdesk", store)
    other_info, other = keys.create("sterling-law", store)
    assert key.startswith("ftk_") and info.key_id in key and key != other
    assert key not in store.read_text() and keys.digest(key) in store.read_text()
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    v = keys.Verifier(store, recheck_s=0)
    assert v.customer(key, 1.0) == "brightdesk" and v.customer(other, 1.0) == "sterling-law"
    # a key's id with another key's secret, a truncated key, garbage: nobody
    forged = f"ftk_{info.key_id}_" + other[len(f"ftk_{other_info.key_id}_") :]
    assert v.customer(forged, 1.0) is None and v.customer(key[:-2], 1.0) is None and v.customer("", 1.0) is None
    keys.revoke(info.key_id, store)
    assert v.customer(key, 2.0) is None and v.customer(other, 2.0) == "sterling-law"
    listed = {k.key_id: k for k in keys.list_keys(path=store)}
    assert listed[info.key_id].revoked and not listed[other_info.key_id].revoked
    with pytest.raises(keys.KeyStoreError):
        keys.revoke("no-such-key", store)
    with pytest.raises(keys.KeyStoreError):
        keys.create("../etc", store)


def test_unreadable_store_admits_no_customer_key(tmp_path):
    store = tmp_path / "api_keys.json"
    _, key = keys.create("brightdesk", store)
    v = keys.Verifier(store, recheck_s=0)
    assert v.customer(key, 1.0) == "brightdesk"
    store.write_text("{not json")
    assert v.customer(key, 2.0) is None  # fail closed, not "keep the last good copy"
    store.unlink()
    assert v.customer(key, 3.0) is None


def test_keys_command(tmp_path):
    env = dict(os.environ, FTOPS_HOME=str(tmp_path), FTOPS_CUSTOMERS=str(TEST_CUSTOMERS))
    env.pop("FTOPS_KEYS_FILE", None)

    def ftops(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(ROOT / ".venv" / "bin" / "ftops"), "keys", *args], env=env, capture_output=True, text=True
        )

    made = ftops("create", "brightdesk", "--json")
    assert made.returncode == 0, made.stderr
    doc = json.loads(made.stdout)
    assert set(doc) == {"customer", "key_id", "key", "scopes"} and doc["customer"] == "brightdesk"
    assert doc["scopes"] == ["inference"]  # the default: vLLM only
    scoped = json.loads(ftops("create", "brightdesk", "--scope", "files", "--scope", "jobs", "--json").stdout)
    assert scoped["scopes"] == ["files", "jobs"]
    bad = ftops("create", "brightdesk", "--scope", "admin")
    assert bad.returncode != 0 and "scopes must be" in bad.stderr
    stored = Path(tmp_path / "secrets" / "api_keys.json").read_text()
    assert doc["key"] not in stored
    listed = ftops("list", "--json")
    # (other tests of the session may have made keys in the same store: this one is among them)
    assert doc["key"] not in listed.stdout and doc["key_id"] in [k["key_id"] for k in json.loads(listed.stdout)]
    unknown = ftops("create", "nobody")
    assert unknown.returncode != 0 and "unknown customer" in unknown.stderr
    assert json.loads(ftops("revoke", doc["key_id"], "--json").stdout)["revoked"]
    assert ftops("revoke", "nope").returncode != 0
