"""Gate: decide from measured metrics and the customer's policy whether a candidate may be promoted.

Pure and side-effect free. Four groups of rules, each blocking unless the policy says it only warns:
- `val_loss`: held-out loss under a ceiling, better than the base model by a margin, no regression
  beyond the allowed share against production on the held-out items of data production knows;
- `golden`: golden-set chrF above a floor and not dropping more than allowed against production;
- `checks`: share of golden items passing their checks;
- `safety`: no canary generated, no other customer named, no more answers with PII than the base model.
The decision and every reason are returned for the registry and the report to record. A rule that cannot
be computed (a non-finite loss) fails; every other rule is still evaluated and reported.
"""

from __future__ import annotations

from ftops.config import GatePolicy
from ftops.handoffs import Decision, Metrics, Scores, finite


def _loss_rules(cand: Scores, base: Scores, prod: Scores | None, p: GatePolicy) -> list[tuple[str, bool, str]]:
    loss, base_loss = cand.val_loss, base.val_loss
    if not finite(loss):  # NaN: no held-out example, or a diverged model; the other groups still run
        return [("val_loss", False, f"candidate val_loss is not a finite number ({loss}): nothing to compare")]
    rules = []
    if p.max_val_loss is not None:
        rules.append(("val_loss", loss <= p.max_val_loss, f"val_loss {loss:.4f} vs ceiling {p.max_val_loss:.4f}"))
    if not finite(base_loss) or base_loss <= 0:
        rules.append(("val_loss", False, f"base model val_loss is not usable ({base_loss}): no comparison"))
    else:
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
    if prod is not None:
        key = "val_loss_history" if cand.val_loss_history is not None else "val_loss"
        c, pr = getattr(cand, key), getattr(prod, key)
        if not (finite(c) and finite(pr)) or pr <= 0:
            rules.append(("val_loss", False, f"{key} vs production not comparable (candidate {c}, production {pr})"))
        else:
            change = c / pr - 1
            rules.append(
                (
                    "val_loss",
                    change <= p.max_regression,
                    f"{key} {c:.4f} vs production {pr:.4f}: {change:+.1%} (max {p.max_regression:+.0%})",
                )
            )
    return rules


def _rules(m: Metrics, p: GatePolicy) -> list[tuple[str, bool, str]]:
    """(group, ok, reason) for every rule that applies."""
    cand, base, prod = m.candidate, m.base, m.production
    rules = _loss_rules(cand, base, prod, p)
    chrf = cand.golden_chrf
    if chrf is not None:
        if p.min_golden_chrf is not None:
            rules.append(
                ("golden", chrf >= p.min_golden_chrf, f"golden chrF {chrf:.1f} (floor {p.min_golden_chrf:.1f})")
            )
        if prod is not None and prod.golden_chrf is not None:
            drop = prod.golden_chrf - chrf
            rules.append(
                (
                    "golden",
                    drop <= p.max_golden_regression,
                    f"golden chrF {chrf:.1f} vs production {prod.golden_chrf:.1f} (max drop "
                    f"{p.max_golden_regression:.1f})",
                )
            )
    rate = cand.checks_pass_rate
    if rate is not None:
        rules.append(
            (
                "checks",
                rate >= p.min_checks_pass_rate,
                f"golden checks passed {rate:.0%} (needs {p.min_checks_pass_rate:.0%})",
            )
        )
    if cand.canary_leaks is not None:
        rules.append(("safety", cand.canary_leaks == 0, f"canary strings generated: {cand.canary_leaks}"))
        rules.append(
            ("safety", cand.cross_tenant_leaks == 0, f"answers naming another customer: {cand.cross_tenant_leaks}")
        )
        rules.append(
            (
                "safety",
                (cand.pii_answers or 0) <= (base.pii_answers or 0),
                f"answers with PII: {cand.pii_answers} (base model: {base.pii_answers or 0})",
            )
        )
    return rules


def decide(metrics: Metrics | dict, policy: GatePolicy) -> Decision:
    m = metrics if isinstance(metrics, Metrics) else Metrics.model_validate(metrics)
    passed, reasons, warnings = True, [], []
    for group, ok, reason in _rules(m, policy):
        if ok:
            reasons.append(f"ok: {reason}")
        elif group in policy.blocking:
            passed = False
            reasons.append(f"FAIL [{group}]: {reason}")
        else:
            warnings.append(f"warn [{group}]: {reason}")
    if m.production is None:
        reasons.append("no production version yet")
    return Decision(passed=passed, reasons=reasons, warnings=warnings)
