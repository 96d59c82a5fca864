"""Typed hand-offs of the control plane: what evaluate, gate, register and promote pass each other.

Airflow carries them between tasks as JSON (XComs); each is built in one place (`Metrics` in
`ftops.model.tasks.evaluate`, `Decision` in `gate.decide`, `Registration` in `ftops.release.tasks.register`,
`Promotion` in `ftops.release.tasks.promote`) and validated again where it is read, so a malformed hand-off is
an error, never a silently missing comparison. Figures that could not be measured are `None` (JSON has no NaN).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


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
    sample: dict[str, str] | None = None  # the first golden prompt and its answer (the serving probe)

    @field_validator("sample")
    @classmethod
    def _no_nul(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        # A model can generate U+0000 (byte-level tokens); PostgreSQL's JSONB refuses it in an XCom.
        return {k: x.replace("\x00", "\ufffd") for k, x in v.items()} if v else v


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


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    passed: bool
    reasons: list[str]
    warnings: list[str] = []

    def as_tags(self) -> dict[str, str]:
        return {
            "gate.decision": "passed" if self.passed else "failed",
            "gate.reasons": " | ".join(self.reasons)[:4900],
            "gate.warnings": " | ".join(self.warnings)[:4900],
        }


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
