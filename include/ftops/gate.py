"""Gate: decide from measured metrics and the customer's policy whether a candidate may be promoted.

Pure and side-effect free. Four groups of rules, each blocking unless the policy says it only warns:
- `val_loss`: held-out loss under a ceiling, better than the base model by a margin, no regression
  beyond the allowed share against production on the held-out items of data production knows;
- `golden`: golden-set chrF above a floor and not dropping more than allowed against production;
- `checks`: share of golden items passing their checks;
- `safety`: no canary generated, no other customer named, no more answers with PII than the base model.
The decision and every reason are returned for the registry and the report to record.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftops.config import GatePolicy


@dataclass
class Decision:
    passed: bool
    reasons: list[str]
    warnings: list[str] = field(default_factory=list)

    def as_tags(self) -> dict[str, str]:
        return {
            "gate.decision": "passed" if self.passed else "failed",
            "gate.reasons": " | ".join(self.reasons)[:4900],
            "gate.warnings": " | ".join(self.warnings)[:4900],
        }


def _rules(metrics: dict, p: GatePolicy) -> list[tuple[str, bool, str]]:
    """(group, ok, reason) for every rule that applies."""
    cand, base, prod = metrics["candidate"], metrics["base"], metrics.get("production")
    loss, base_loss = cand["val_loss"], base["val_loss"]
    if loss != loss:  # NaN: no held-out example
        return [("val_loss", False, "no held-out examples to score the candidate on")]
    rules = []
    if p.max_val_loss is not None:
        rules.append(("val_loss", loss <= p.max_val_loss, f"val_loss {loss:.4f} vs ceiling {p.max_val_loss:.4f}"))
    gain = 1 - loss / base_loss
    rules.append(
        (
            "val_loss",
            gain >= p.min_improvement_over_base,
            f"val_loss {loss:.4f} vs base {base_loss:.4f}: {gain:+.1%} (needs {p.min_improvement_over_base:+.0%})",
        )
    )
    # New data is unseen by production, so it favours the candidate: compare on held-out items of the data
    # production was trained on (when there is history), which also measures forgetting.
    if prod:
        key = "val_loss_history" if cand.get("val_loss_history") is not None else "val_loss"
        change = cand[key] / prod[key] - 1
        rules.append(
            (
                "val_loss",
                change <= p.max_regression,
                f"{key} {cand[key]:.4f} vs production {prod[key]:.4f}: {change:+.1%} (max {p.max_regression:+.0%})",
            )
        )
    chrf = cand.get("golden_chrf")
    if chrf is not None:
        if p.min_golden_chrf is not None:
            rules.append(
                ("golden", chrf >= p.min_golden_chrf, f"golden chrF {chrf:.1f} (floor {p.min_golden_chrf:.1f})")
            )
        if prod and prod.get("golden_chrf") is not None:
            drop = prod["golden_chrf"] - chrf
            rules.append(
                (
                    "golden",
                    drop <= p.max_golden_regression,
                    f"golden chrF {chrf:.1f} vs production {prod['golden_chrf']:.1f} (max drop "
                    f"{p.max_golden_regression:.1f})",
                )
            )
    rate = cand.get("checks_pass_rate")
    if rate is not None:
        rules.append(
            (
                "checks",
                rate >= p.min_checks_pass_rate,
                f"golden checks passed {rate:.0%} (needs {p.min_checks_pass_rate:.0%})",
            )
        )
    if "canary_leaks" in cand:
        rules.append(("safety", cand["canary_leaks"] == 0, f"canary strings generated: {cand['canary_leaks']}"))
        rules.append(
            (
                "safety",
                cand["cross_tenant_leaks"] == 0,
                f"answers naming another customer: {cand['cross_tenant_leaks']}",
            )
        )
        rules.append(
            (
                "safety",
                cand["pii_answers"] <= base.get("pii_answers", 0),
                f"answers with PII: {cand['pii_answers']} (base model: {base.get('pii_answers', 0)})",
            )
        )
    return rules


def decide(metrics: dict, policy: GatePolicy) -> Decision:
    passed, reasons, warnings = True, [], []
    for group, ok, reason in _rules(metrics, policy):
        if ok:
            reasons.append(f"ok: {reason}")
        elif group in policy.blocking:
            passed = False
            reasons.append(f"FAIL [{group}]: {reason}")
        else:
            warnings.append(f"warn [{group}]: {reason}")
    if "production" not in metrics:
        reasons.append("no production version yet")
    return Decision(passed, reasons, warnings)
