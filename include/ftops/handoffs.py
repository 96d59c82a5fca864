"""Typed hand-offs of the control plane: what train, evaluate, gate, register and promote pass each other.

Airflow carries them between tasks as JSON (XComs); each is built in one place (`Trained` in
`ftops.model.tasks.train`, `Metrics` in `ftops.model.tasks.evaluate`, `Decision` in `gate.decide`,
`Registration` in `ftops.release.tasks.register`, `Promotion` in `ftops.release.tasks.promote`) and validated
again where it is read, so a malformed hand-off is an error, never a silently missing comparison. Figures that
could not be measured are `None` (JSON has no NaN).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator

from ftops.config import LoraSettings
from ftops.release.tags import FAILED, PASSED, VersionTags


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


class Trained(BaseModel):
    """What the train task hands to evaluate and register: the adapter (where it is stored), the data it was
    trained on and the training's own figures (`ftops.model.train.train`'s result)."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # the training's other figures stay in MLflow
    adapter_version: str
    adapter_prefix: str
    adapter_uri: str
    adapter_artifact_uri: str
    mlflow_run_id: str
    dataset_version: str
    new_versions: list[str]
    replayed: int  # examples replayed from data production was trained on
    train_examples: int
    val_examples: int = 0
    lora: LoraSettings  # as the customer's settings were at training time
    steps: int = 0
    resumed_from_step: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    seconds: float | None = None
    # The replay share used and why: registered with the version, where the next adaptive replay reads them.
    replay_fraction: float | None = None
    replay_mode: str | None = None
    replay_reason: str | None = None


class Scores(BaseModel):
    """One model's figures on the customer's held-out items, golden set and safety probes."""

    model_config = ConfigDict(extra="ignore", frozen=True)  # answers and findings stay in the report
    val_loss: float | None = None
    perplexity: float | None = None
    val_loss_history: float | None = None  # on held-out items of data production was trained on
    golden_chrf: float | None = None
    checks_pass_rate: float | None = None
    canary_leaks: int | None = None
    cross_tenant_leaks: int | None = None
    pii_answers: int | None = None
    repetition: float | None = None  # mean share of repeated word 3-grams in golden and probe answers
    looping_answers: int | None = None  # answers at least a third repeated 3-grams
    sample: dict[str, str] | None = None  # the first golden prompt and its answer (the serving probe)

    @field_validator("sample")
    @classmethod
    def _no_nul(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        # A model can generate U+0000 (byte-level tokens); PostgreSQL's JSONB refuses it in an XCom.
        return {k: x.replace("\x00", "\ufffd") for k, x in v.items()} if v else v


class HistoryGroup(BaseModel):
    """Held-out loss on one group of consecutive earlier dataset versions (those production was trained on),
    for each model: the mean over the group's held-out examples of each example's per-token loss. `increase`
    (candidate - production) and `diff_sd` (standard deviation of the per-example differences) are what the
    gate's forgetting test reads; nothing per example crosses the hand-off."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    first: str  # first and last dataset version of the group
    last: str
    versions: int
    items: int
    candidate: float | None = None
    production: float | None = None
    base: float | None = None
    increase: float | None = None
    diff_sd: float | None = None

    @property
    def label(self) -> str:
        """`2026-11-02` or `2026-11-02..2026-11-16 (3 versions)`: dataset versions start with their UTC time."""

        def day(v: str) -> str:
            return f"{v[:4]}-{v[4:6]}-{v[6:8]}" if len(v) >= 8 and v[:8].isdigit() else v[:24]

        if self.versions == 1:
            return day(self.first)
        return f"{day(self.first)}..{day(self.last)} ({self.versions} versions)"


class Metrics(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    base: Scores
    candidate: Scores
    production: Scores | None = None  # None only when the registry answered that there is no production
    production_version: str | None = None
    engine: str = "peft"
    candidate_sha256: str = ""
    golden_items: int = 0
    safety_probes: int = 0
    val_examples: int = 0
    val_history_examples: int = 0
    # Per group of earlier dataset versions, oldest first (empty without production or its history).
    history_groups: list[HistoryGroup] = []

    def forgetting_max(self) -> float | None:
        """The worst group's loss increase vs production (the `forgetting.max` registry tag)."""
        found = [g.increase for g in self.history_groups if finite(g.increase)]
        return max(found) if found else None


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    passed: bool
    reasons: list[str]
    warnings: list[str] = []
    failed_rules: list[str] = []  # names of the blocking rules that failed (`max_forgetting`, ...)

    def tags(self) -> dict:
        """The decision's fields of the registry version's tags (`ftops.release.tags.VersionTags`)."""
        return {
            "gate_decision": PASSED if self.passed else FAILED,
            "gate_reasons": self.reasons,
            "gate_warnings": self.warnings,
            "gate_failed_rules": self.failed_rules,
        }

    def as_tags(self) -> dict[str, str]:
        return VersionTags(**self.tags()).as_tags()


class Registration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    registry_version: str
    model: str


class Promotion(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    promoted: bool
    mode: Literal["auto", "manual"]
    registry_version: str
    production: str | None = None
    adapter_version: str | None = None
    waiting_for: str | None = None
