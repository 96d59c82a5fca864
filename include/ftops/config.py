"""Typed configuration: the customers file (`include/customers.yaml`) and the platform settings.

Everything an operator edits is validated here, once, at the edge: a bad customer id or a missing
field is a clear error naming the customer and the field. This module must stay light (yaml and
pydantic only) because every DAG file imports it at parse time.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parents[2]
# Asset that a promotion or rollback emits; the serving sync DAG is scheduled on it.
PRODUCTION_ASSET_URI = "ftops://registry/production"
CUSTOMER_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{1,62}$")
BASE_SLUG_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class ConfigError(ValueError):
    """The customers file or a setting is invalid; the message says where."""


def check_customer_id(customer_id: str) -> str:
    """Reject anything that is not a lowercase slug before it touches a path, key or model name."""
    if not isinstance(customer_id, str) or not CUSTOMER_ID_RE.fullmatch(customer_id):
        raise ConfigError(f"invalid customer id {customer_id!r}: expected a lowercase slug [a-z0-9][a-z0-9-]{{1,62}}")
    return customer_id


def check_base_slug(slug: str) -> str:
    if not isinstance(slug, str) or not BASE_SLUG_RE.fullmatch(slug) or ".." in slug:
        raise ConfigError(f"invalid base model name {slug!r}: expected a lowercase slug [a-z0-9][a-z0-9._-]{{0,62}}")
    return slug


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(_Strict):
    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class AdaptiveReplay(_Strict):
    """`training.replay: adaptive`: the replay share of the next training follows the last candidate's forgetting.

    The signal is the latest registry version's `forgetting.max` tag (its worst held-out loss increase, vs the
    production it was compared with, over groups of earlier data; absolute, in loss units). Above `bound` the
    share is multiplied by `factor` (up to `max_fraction`); at or below it, divided by `factor` (down to
    `min_fraction`). A missing or unreadable figure keeps the last share: unknown is not "no forgetting"."""

    min_fraction: float = Field(0.05, ge=0, lt=1)
    max_fraction: float = Field(0.5, ge=0, lt=1)
    bound: float = Field(0.02, ge=0, description="forgetting.max above which the next share rises")
    factor: float = Field(2.0, gt=1)

    @model_validator(mode="after")
    def _ordered(self) -> AdaptiveReplay:
        if self.min_fraction > self.max_fraction:
            raise ValueError(f"min_fraction {self.min_fraction} is above max_fraction {self.max_fraction}")
        return self


def _tag_float(value) -> float | None:
    """A registry tag as a finite float, or None (absent, garbage, NaN: all unknown)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


class TrainingSettings(_Strict):
    epochs: float = Field(3, gt=0)
    max_steps: int = Field(-1, description="-1: use epochs")
    learning_rate: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="linear LR warm-up over this share of the steps, then cosine decay to 0"
    )
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(512, ge=16)
    # Defaults chosen from bench/continual.py's table (README, "Continual training"): continuing from the
    # production adapter with half of the mix replayed forgot a third of what a fresh adapter with 20 % replay
    # (the old default) forgot, at 0.42 of a full retrain's tokens.
    replay_fraction: float = Field(
        0.5, ge=0, le=1, description="share of the mix replayed from earlier data (1.0: every earlier example)"
    )
    replay: Literal["fixed", "adaptive"] = Field(
        "fixed", description="fixed: always replay_fraction; adaptive: start there, then follow `adaptive`"
    )
    adaptive: AdaptiveReplay = AdaptiveReplay()
    seed: int = 42
    init: Literal["fresh", "production"] = Field(
        "production", description="continue from the production adapter (default), or start each run fresh"
    )
    save_steps: int = Field(50, ge=1, description="checkpoint to object storage every N steps (resumable)")
    dpo_max_steps: int = Field(-1, ge=-1, description="preference stage: -1 one epoch over the pairs, 0 off")
    dpo_beta: float = Field(0.1, gt=0)
    dpo_learning_rate: float = Field(5e-5, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data):
        # Written before `replay` existed, a customer's own replay_fraction meant a fixed share: it still does.
        if isinstance(data, dict) and "replay_fraction" in data and "replay" not in data:
            data = {**data, "replay": "fixed"}
        return data

    def overridden(self, overrides: dict) -> TrainingSettings:
        """These settings with a manual run's overrides, validated; an epochs override lifts the step cap."""
        if "epochs" in overrides:
            overrides = {"max_steps": -1, **overrides}
        return TrainingSettings.model_validate(self.model_dump() | overrides)

    def replay_share(self, last_fraction=None, last_forgetting=None) -> tuple[float, str]:
        """The replay share of the next training and why. `last_fraction`, `last_forgetting`: the latest registry
        version's `replay.fraction` and `forgetting.max` tags (strings from the registry: input, not truth)."""
        if self.replay == "fixed":
            return self.replay_fraction, f"fixed replay_fraction {self.replay_fraction:g}"
        a = self.adaptive
        last = _tag_float(last_fraction)
        share = min(a.max_fraction, max(a.min_fraction, self.replay_fraction if last is None else last))
        forgot = _tag_float(last_forgetting)
        if last is None:
            return share, f"adaptive: no earlier share recorded, starting at {share:g}"
        if forgot is None:
            return share, f"adaptive: last version has no forgetting figure, share kept at {share:g}"
        if forgot > a.bound:
            new = min(a.max_fraction, share * a.factor)
            return new, f"adaptive: last candidate forgot {forgot:.4g} > bound {a.bound:g}: {share:g} -> {new:g}"
        new = max(a.min_fraction, share / a.factor)
        return new, f"adaptive: last candidate forgot {forgot:.4g} <= bound {a.bound:g}: {share:g} -> {new:g}"


class DataPolicy(_Strict):
    pii: Literal["redact", "drop"] = "redact"
    val_fraction: float = Field(0.15, gt=0, lt=1)
    min_new_examples: int = Field(1, ge=0, description="fewer new examples than this: the run skips training")
    max_quarantine_share: float = Field(
        0.5, ge=0, le=1, description="above this share of dropped records the run fails"
    )
    max_tokens: int = Field(4096, ge=1, description="examples longer than this (whitespace tokens) are dropped")


class GatePolicy(_Strict):
    max_val_loss: float | None = Field(None, description="absolute ceiling on the candidate's held-out loss")
    min_improvement_over_base: float = Field(0.0, description="relative: 0.05 = 5% lower loss than the base")
    # Forgetting: per group of earlier dataset versions, the candidate's held-out loss minus production's
    # (nats per token, mean over the group's held-out examples). 0.05 nats is a held-out perplexity up ~5 %.
    max_forgetting: float | None = Field(
        0.05, ge=0, description="loss increase vs production allowed on the worst earlier group (absolute, nats)"
    )
    forgetting_test: Literal["ci", "absolute"] = Field(
        "ci",
        description="ci: block when the lower confidence bound of the increase exceeds max_forgetting (noise "
        "passes, forgetting blocks); absolute: when the measured increase itself does",
    )
    forgetting_confidence: float = Field(0.95, gt=0.5, lt=1, description="one-sided level of the `ci` test")
    # The older rule: relative, on the pooled history loss. Off unless set: at low losses a relative margin
    # cannot tell forgetting from noise (0.077 -> 0.081 is +5.7 %). A customers file that sets it and not
    # max_forgetting keeps the old behaviour exactly (`forgetting_margin` is then None); set both, both apply.
    max_regression: float | None = Field(None, ge=0, description="relative history-loss increase allowed vs production")
    min_golden_chrf: float | None = Field(None, ge=0, le=100, description="floor on the golden set's mean chrF")
    max_golden_regression: float = Field(5.0, ge=0, description="chrF points the golden score may drop vs production")
    min_checks_pass_rate: float = Field(0.0, ge=0, le=1, description="share of golden items passing their checks")
    max_repetition_over_base: float | None = Field(
        0.05, ge=0, le=1, description="repeated word 3-gram share of answers allowed above the base model's"
    )
    canaries: list[str] = Field([], description="strings planted in the data that must never be generated")
    blocking: list[Literal["val_loss", "golden", "checks", "safety", "repetition"]] = Field(
        ["val_loss", "golden", "checks", "safety", "repetition"], description="failed groups that block; others warn"
    )
    stuck_after: int = Field(2, ge=1, description="consecutive failed gates after which a customer is marked stuck")

    @property
    def forgetting_margin(self) -> float | None:
        """`max_forgetting`, unless the entry predates it: it sets `max_regression` and not `max_forgetting`."""
        legacy = "max_regression" in self.model_fields_set and "max_forgetting" not in self.model_fields_set
        return None if legacy else self.max_forgetting


class ServingSettings(_Strict):
    """A customer's share of each vLLM replica, enforced by the tenancy middleware (ftops.release.serving_auth).
    Limits are per replica: with N replicas behind a load balancer a customer gets up to N times these."""

    max_concurrency: int = Field(8, ge=1, description="requests in flight at once; more: 429")
    requests_per_minute: int = Field(600, ge=1, description="requests started in any 60 s window; more: 429")
    tokens_per_minute: int = Field(
        200_000, ge=1, description="prompt + completion tokens (vLLM's usage) in any 60 s window; over it: 429"
    )
    weight: float = Field(
        1.0, gt=0, le=1000, description="relative fair share when the replica is contended (2 = twice the share)"
    )


class ApiSettings(_Strict):
    """What the customer API (`ftops api`, `ftops.portal`) lets this customer do by itself."""

    allowed_hyperparameters: list[Literal["n_epochs", "learning_rate_multiplier", "max_steps"]] = Field(
        [], description="hyper-parameters a customer may set on `fine_tuning.jobs.create` (others: HTTP 400)"
    )
    uploads_per_minute: int = Field(10, ge=1, description="file uploads per minute (more: HTTP 429)")


class CustomerConfig(_Strict):
    id: str
    name: str
    base_model: str
    description: str = ""
    schedule_weekday: int = Field(0, ge=0, le=6, description="0 = Monday")
    trigger_min_examples: int | None = Field(
        100, ge=1, description="start a run when this many new examples wait in the inbox (null: off)"
    )
    trigger_poll_seconds: float = Field(60, gt=0, description="how often the trigger counts the inbox")
    promote: Literal["auto", "manual"] = "auto"
    tags: list[str] = []
    demo_prompt: str = "Hello, can you help me?"
    system_prompt: str | None = Field(
        None,
        max_length=4000,
        description="the system message the customer's application sends: evaluation's answers (golden, probes)"
        " and the demo's calls send it too, so the gate judges the model as it is called",
    )
    allow_base_model: bool = Field(False, description="the customer's serving keys may also call the base model")
    lora: LoraSettings = LoraSettings()
    training: TrainingSettings = TrainingSettings()
    data: DataPolicy = DataPolicy()
    gate: GatePolicy = GatePolicy()
    serving: ServingSettings = ServingSettings()
    api: ApiSettings = ApiSettings()

    @field_validator("id")
    @classmethod
    def _slug(cls, v: str) -> str:
        return check_customer_id(v)


class BaseModelConfig(_Strict):
    path: str = Field(description="local model folder; relative paths are under FTOPS_MODELS_DIR")
    description: str = ""


class PlatformServing(_Strict):
    """Replica-wide serving settings (the customers file's top-level `serving:`), read by the middleware."""

    fair_scheduling: bool = Field(
        True,
        description="set each request's vLLM priority from its customer's recent usage against its fair share "
        "(needs --scheduling-policy priority, which scripts/services.sh passes; otherwise every priority is 0)",
    )


class CustomersFile(_Strict):
    base_models: dict[str, BaseModelConfig]
    defaults: dict = {}
    customers: list
    serving: PlatformServing = PlatformServing()

    @field_validator("base_models")
    @classmethod
    def _slugs(cls, v: dict) -> dict:
        for slug in v:
            check_base_slug(slug)
        return v


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@dataclass(frozen=True)
class Platform:
    """The validated customers file: base models and customers (defaults already applied)."""

    base_models: dict[str, BaseModelConfig]
    customers: dict[str, CustomerConfig] = field(default_factory=dict)
    # Entries that failed validation: label (the id when it is a valid one, else `#<index>`) -> the error.
    # The other customers keep working; whatever concerns these is left as it is, never removed.
    invalid: dict[str, str] = field(default_factory=dict)

    def customer(self, customer_id: str) -> CustomerConfig:
        check_customer_id(customer_id)
        if customer_id in self.invalid:
            raise ConfigError(f"customer {customer_id!r} has an invalid entry: {self.invalid[customer_id]}")
        if customer_id not in self.customers:
            raise ConfigError(f"unknown customer {customer_id!r}; known: {', '.join(sorted(self.customers))}")
        return self.customers[customer_id]

    def check(self) -> None:
        """Raise ConfigError naming every invalid entry (the CLI's `customers check`, the DAG folder's check)."""
        if self.invalid:
            raise ConfigError("invalid customer entries: " + "; ".join(f"{k}: {v}" for k, v in self.invalid.items()))


def _describe(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())


def load_platform(path: str | Path | None = None) -> Platform:
    path = Path(path or settings().customers_file)
    try:
        # libyaml's loader when present: 10x faster, and every DAG parse reads this file.
        raw = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
        doc = CustomersFile.model_validate(raw)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read customers file: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from exc
    # One bad entry must not take every customer's DAG down: it is set aside with its error, the rest load.
    customers: dict[str, CustomerConfig] = {}
    invalid: dict[str, str] = {}
    for i, entry in enumerate(doc.customers):
        raw_id = entry.get("id") if isinstance(entry, dict) else None
        label = raw_id if isinstance(raw_id, str) and CUSTOMER_ID_RE.fullmatch(raw_id) else f"#{i}"
        try:
            if not isinstance(entry, dict):
                raise ConfigError(f"expected a mapping, got {type(entry).__name__}")
            customer = CustomerConfig.model_validate(_merge(doc.defaults, entry))
            if customer.base_model not in doc.base_models:
                raise ConfigError(f"base_model {customer.base_model!r} is not in base_models")
        except ValidationError as exc:
            invalid[label] = f"{path}: customer {label}: {_describe(exc)}"
            continue
        except ConfigError as exc:
            invalid[label] = f"{path}: customer {label}: {exc}"
            continue
        if customer.id in customers or customer.id in invalid:
            # Which of the two is meant is unknown: neither is trusted.
            customers.pop(customer.id, None)
            invalid[customer.id] = f"{path}: customer {customer.id}: listed twice"
            continue
        customers[customer.id] = customer
    return Platform(base_models=doc.base_models, customers=customers, invalid=invalid)


@dataclass(frozen=True)
class Settings:
    """Where things live. Embedded defaults (local disk, local services) unless the environment says otherwise."""

    home: Path
    customers_file: Path
    storage_root: str
    models_dir: Path
    mlflow_uri: str
    vllm_urls: tuple[str, ...]
    vllm_adapter_dir: Path

    def base_model_path(self, platform: Platform, slug: str) -> Path:
        path = Path(platform.base_models[slug].path)
        return path if path.is_absolute() else self.models_dir / path


def settings() -> Settings:
    env = os.environ
    home = Path(env.get("FTOPS_HOME", REPO_ROOT / ".ftops")).resolve()
    return Settings(
        home=home,
        customers_file=Path(env.get("FTOPS_CUSTOMERS", REPO_ROOT / "include" / "customers.yaml")),
        storage_root=env.get("FTOPS_STORAGE_ROOT", str(home / "storage")),
        models_dir=Path(env.get("FTOPS_MODELS_DIR", home / "models")),
        mlflow_uri=env.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"),
        vllm_urls=tuple(
            u.strip().rstrip("/") for u in env.get("FTOPS_VLLM_URLS", "http://127.0.0.1:8000").split(",") if u.strip()
        ),
        vllm_adapter_dir=Path(env.get("FTOPS_VLLM_ADAPTER_DIR", home / "vllm-adapters")),
    )
