"""Right to erasure: `ftops data erase` keeps named examples out of every future training and replay, stores no
copy of the request, and says which dataset and adapter versions held them."""

from __future__ import annotations

import io
import json
from pathlib import Path

from ftops.config import DataPolicy
from ftops.data import snapshot as snap
from ftops.data.ingest import InboxFile
from ftops.data.tasks import prepare
from ftops.release.registry import AdapterVersion
from ftops.storage import Store


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def upload(store: Store, name: str, records: list[dict]) -> str:
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    out = prepare(store, "brightdesk", [InboxFile(name, name, lambda: io.BytesIO(data))], DataPolicy(val_fraction=0.3))
    return out["dataset_version"]


def test_erased_examples_never_reach_training_or_replay_and_versions_are_reported(tmp_path):
    root = tmp_path / "storage"
    store = Store(str(root))
    first = [chat(f"How do I reset account {i}?", f"Open settings for account {i}.") for i in range(20)]
    first[3] = chat("My name is Zebulon Quaxley, fix my export", "Sure Zebulon Quaxley, retry the export.")
    v1 = upload(store, "a.jsonl", first)
    v2 = upload(store, "b.jsonl", [chat(f"Where is invoice {i}?", f"Under billing, invoice {i}.") for i in range(20)])
    from typer.testing import CliRunner

    from ftops.cli import app

    env = dict(
        FTOPS_STORAGE_ROOT=str(root),
        FTOPS_HOME=str(tmp_path / "home"),
        FTOPS_CUSTOMERS=str(Path(__file__).parent / "data" / "customers.yaml"),
        MLFLOW_TRACKING_URI="http://127.0.0.1:9",  # nothing listens: the registry is down
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="5",
    )
    cmd = ["data", "erase", "--customer", "brightdesk", "--json"]
    done = CliRunner().invoke(app, cmd + ["--match", "zebulon  QUAXLEY"], env=env)
    out = json.loads(done.stdout)
    assert out["examples"] == 1 and out["dataset_versions"] == {v1: 1}
    assert done.exit_code == 3 and "registry unavailable" in out["adapter_versions_error"]  # erasure stands
    rows, val, _ = snap.training_mix(store, "brightdesk", [v2], [v1], 0.5, 0)
    texts = json.dumps(rows + val)
    assert "Zebulon" not in texts and len(rows) + len(val) > 20  # the rest of v1 is still replayed
    tomb = store.list("brightdesk/erasure")
    assert len(tomb) == 1 and "Zebulon" not in store.get(tomb[0]).decode().title()
    # by example id: one of v2's examples
    victim = snap.read_jsonl(store.get(f"brightdesk/datasets/{v2}/train.jsonl"))[0]["id"]
    done = CliRunner().invoke(app, cmd + ["--example", victim], env=env)
    assert json.loads(done.stdout)["dataset_versions"] == {v2: 1}
    rows, val, _ = snap.training_mix(store, "brightdesk", [v2], [v1], 0.5, 0)
    assert victim not in {r["id"] for r in rows + val}
    bad = CliRunner().invoke(app, cmd, env=env)
    assert bad.exit_code == 2 and "exactly one of" in bad.stderr


def test_adapter_versions_that_saw_the_examples():
    def version(n: str, upto: str, new: str) -> AdapterVersion:
        return AdapterVersion("acme", n, [], {"dataset.version": upto, "dataset.new_versions": new}, "", 0)

    history = [version("1", "v1", "v1"), version("2", "v2", "v2"), version("3", "v3", "v3"), version("4", "v1", "v1")]
    assert snap.adapters_containing(history, {"v2"}) == {"trained_on": ["2"], "may_carry": ["3"]}
    assert snap.adapters_containing(history, set()) == {"trained_on": [], "may_carry": []}
