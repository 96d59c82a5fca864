"""A registry version's tags: their names and types, spelled once.

Register, the gate, the fleet page's actions and the demo write them through `VersionTags(...).as_tags()`;
everything that reads them goes through `VersionTags.read(tags)`. Tags are input (anyone with write access to
MLflow can set them): a figure that does not parse reads as None and a list as what parses, never as a crash;
the adapter's own values are checked before anything is copied or loaded (`AdapterVersion.checked`).
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

PASSED, FAILED = "passed", "failed"
LIMIT = 4900  # MLflow refuses a tag value over 5,000 characters
JOINED = ("gate_reasons", "gate_warnings")  # sentences (commas inside): `|`-joined


def _tag(name: str, **kw) -> Any:
    return Field(kw.pop("default", None), alias=name, **kw)


class VersionTags(BaseModel):
    model_config = ConfigDict(populate_by_name=True, frozen=True, extra="ignore")

    # lineage
    customer: str | None = _tag("customer")
    base_model: str | None = _tag("base_model")
    dag_id: str | None = _tag("airflow.dag_id")
    run_id: str | None = _tag("airflow.run_id")
    # the adapter (checked by AdapterVersion.checked before use)
    adapter_version: str | None = _tag("adapter.version")
    adapter_prefix: str | None = _tag("adapter.prefix")
    adapter_uri: str | None = _tag("adapter.uri")
    adapter_sha256: str | None = _tag("adapter.sha256")
    adapter_tree_sha256: str | None = _tag("adapter.tree_sha256")
    lora_r: int | None = _tag("lora.r")
    lora_alpha: int | None = _tag("lora.alpha")
    lora_target_modules: list[str] | None = _tag("lora.target_modules")
    # the data
    dataset_version: str | None = _tag("dataset.version")
    dataset_new_versions: list[str] | None = _tag("dataset.new_versions")
    dataset_fingerprint: str | None = _tag("dataset.fingerprint")
    replay_examples: int | None = _tag("replay.examples")
    replay_share: float | None = _tag("replay.share")
    replay_fraction: float | None = _tag("replay.fraction")  # adaptive replay reads it back
    replay_mode: str | None = _tag("replay.mode")
    replay_reason: str | None = _tag("replay.reason")
    # evaluation and the gate
    candidate_val_loss: float | None = _tag("metrics.candidate_val_loss")
    base_val_loss: float | None = _tag("metrics.base_val_loss")
    production_val_loss: float | None = _tag("metrics.production_val_loss")
    val_examples: int | None = _tag("metrics.val_examples")
    candidate_golden_chrf: float | None = _tag("metrics.candidate_golden_chrf")
    candidate_checks_pass_rate: float | None = _tag("metrics.candidate_checks_pass_rate")
    candidate_canary_leaks: int | None = _tag("metrics.candidate_canary_leaks")
    candidate_repetition: float | None = _tag("metrics.candidate_repetition")
    base_repetition: float | None = _tag("metrics.base_repetition")
    eval_engine: str | None = _tag("eval.engine")
    forgetting_max: float | None = _tag("forgetting.max")
    forgetting_groups: list[dict] | None = _tag("forgetting.groups")
    gate_decision: str | None = _tag("gate.decision")  # passed | failed; absent: not evaluated
    gate_reasons: list[str] | None = _tag("gate.reasons")
    gate_warnings: list[str] | None = _tag("gate.warnings")
    gate_failed_rules: list[str] | None = _tag("gate.failed_rules")
    # what the serving engine answered at the gate (the reconciler checks a swap reproduces it)
    probe_prompt: str | None = _tag("probe.prompt")
    probe_answer: str | None = _tag("probe.answer")
    # a move of production by a person (the fleet page)
    promoted_by: str | None = _tag("promoted.by")
    promoted_at: str | None = _tag("promoted.at")
    promoted_action: str | None = _tag("promoted.action")

    @classmethod
    def read(cls, tags: dict[str, str] | None) -> VersionTags:
        """The tags of a registry version, leniently: what does not parse reads as absent."""
        values = {}
        for name, field in cls.model_fields.items():
            raw = (tags or {}).get(field.alias or name)
            if isinstance(raw, str):
                values[name] = _parse(raw, field.annotation, " | " if name in JOINED else ",")
        return cls.model_construct(**values)

    def as_tags(self) -> dict[str, str]:
        """The set fields as MLflow tags (strings; lists comma-joined, the gate's reasons `|`-joined)."""
        out = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            if value is None:
                continue
            key = field.alias or name
            if name == "forgetting_groups":
                text = json.dumps(value, separators=(",", ":"))
            elif name in JOINED:
                text = " | ".join(value)
            elif isinstance(value, list):
                text = ",".join(value)
            elif isinstance(value, float):
                text = str(value) if math.isfinite(value) else "nan"
            else:
                text = str(value)
            out[key] = text[:LIMIT]
        return out

    @property
    def gate(self) -> str:
        return self.gate_decision if self.gate_decision in (PASSED, FAILED) else "not evaluated"

    @property
    def passed(self) -> bool:
        return self.gate_decision == PASSED

    @field_validator("gate_decision")
    @classmethod
    def _decision(cls, v: str | None) -> str | None:
        if v is not None and v not in (PASSED, FAILED):
            raise ValueError(f"gate.decision is {PASSED} or {FAILED}")
        return v


def _parse(raw: str, annotation, sep: str) -> Any:
    kind = str(annotation)
    if "list[dict]" in kind:
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return [g for g in value if isinstance(g, dict)] if isinstance(value, list) else None
    if "list[str]" in kind:
        return [x.strip() for x in raw.split(sep) if x.strip()]
    if "float" in kind:
        try:
            value = float(raw)
        except ValueError:
            return None
        return value if math.isfinite(value) else None
    if "int" in kind:
        return int(raw) if raw.strip().lstrip("-").isdigit() else None
    return raw
