"""A registry version's tags, written and read through one typed model (`ftops.release.tags.VersionTags`):
what register writes reads back the same, and what anyone with MLflow write access sets reads as absent, not
as a crash of the fleet page or a wrong verdict."""

from __future__ import annotations

from ftops.handoffs import Decision
from ftops.operate.retention import retention, version_forgetting
from ftops.release.tags import VersionTags


def test_what_register_writes_reads_back_the_same():
    written = VersionTags(
        **{"airflow.run_id": "manual__2026-11-30", "customer": "acme"},
        adapter_version="20261130T0100-abcd1234",
        dataset_new_versions=["v1", "v2"],
        replay_examples=12,
        replay_fraction=0.25,
        lora_r=8,
        candidate_val_loss=1.25,
        forgetting_max=0.01,
        forgetting_groups=[{"first": "v1", "last": "v1", "versions": 1, "items": 4, "candidate": 1.0}],
        **Decision(passed=False, reasons=["val_loss 1.2 > 1.1, by 9 %", "golden ok"], failed_rules=["val_loss"]).tags(),
    )
    tags = written.as_tags()
    assert all(isinstance(v, str) and len(v) <= 4900 for v in tags.values())
    assert tags["gate.decision"] == "failed" and tags["lora.r"] == "8" and tags["dataset.new_versions"] == "v1,v2"
    read = VersionTags.read(tags)
    assert read == written
    assert read.gate_reasons == ["val_loss 1.2 > 1.1, by 9 %", "golden ok"]  # a comma inside a reason survives
    assert not read.passed and read.gate == "failed" and read.run_id == "manual__2026-11-30"


def test_crafted_or_malformed_tags_read_as_absent():
    read = VersionTags.read(
        {
            "gate.decision": "PASSED-by-me",
            "lora.r": "8; rm -rf /",
            "metrics.candidate_val_loss": "nan",
            "forgetting.max": "inf",
            "replay.fraction": "lots",
            "forgetting.groups": "{not json",
            "replay.examples": "1e9",
        }
    )
    assert read.gate == "not evaluated" and not read.passed  # never promotable on a made-up decision
    assert read.lora_r is None and read.candidate_val_loss is None and read.forgetting_max is None
    assert read.replay_fraction is None and read.replay_examples is None and read.forgetting_groups is None
    assert version_forgetting(read) == {"max": None, "groups": []}
    # a group list with one malformed entry shows no figures for that version rather than some
    bad = VersionTags.read({"forgetting.groups": '[{"first": "v1", "last": "v1", "versions": 1, "items": "many"}]'})
    assert retention([("1", bad)])["series"] == [] and VersionTags.read(None) == VersionTags()
