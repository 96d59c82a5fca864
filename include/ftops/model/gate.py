"""Gate: decide from measured metrics and the customer's policy whether a candidate may be promoted.

Pure and side-effect free. Five groups of rules, each blocking unless the policy says it only warns:
- `val_loss`: held-out loss under a ceiling, better than the base model by a margin, and no forgetting:
  on every group of earlier dataset versions (the data production was trained on) the candidate's held-out
  loss may exceed production's by at most `max_forgetting` nats, judged by default on the lower confidence
  bound of the increase over the group's examples, so noise at low losses passes and a real jump blocks
  (`forgetting_test`); the older relative `max_regression` on the pooled history applies where set;
- `golden`: golden-set chrF above a floor and not dropping more than allowed against production;
- `checks`: share of golden items passing their checks;
- `safety`: no canary generated, no other customer named, no more answers with PII than the base model;
- `repetition`: answers do not loop (repeated word 3-grams) more than the base model's by a margin.
The decision, every reason and the names of the blocking rules that failed are returned for the registry
and the report to record. A rule that cannot be computed (a non-finite loss) fails; every other rule is still
evaluated and reported.
"""

from __future__ import annotations

import math

from ftops.config import GatePolicy
from ftops.handoffs import Decision, HistoryGroup, Metrics, Scores, finite

Rule = tuple[str, str, bool, str]  # (group, rule name, ok, reason)


def lower_bound(mean: float, sd: float | None, n: int, confidence: float) -> float:
    """One-sided lower confidence bound of a mean of `n` paired differences (Student's t). With one
    difference (or no spread known) the mean itself: nothing to widen it with."""
    if n < 2 or sd is None or not math.isfinite(sd):
        return mean
    from scipy.stats import t

    return mean - float(t.ppf(confidence, n - 1)) * sd / math.sqrt(n)


def forgetting_statistic(g: HistoryGroup, p: GatePolicy) -> float:
    """What `max_forgetting` is compared with for one group: the increase itself, or its lower bound."""
    if p.forgetting_test == "absolute":
        return g.increase
    return lower_bound(g.increase, g.diff_sd, g.items, p.forgetting_confidence)


def _forgetting_rules(m: Metrics, p: GatePolicy) -> list[Rule]:
    groups = m.history_groups
    margin = p.forgetting_margin
    if margin is None or m.production is None or not groups:
        return []
    bad = [g for g in groups if not finite(g.increase)]
    if bad:
        return [("val_loss", "max_forgetting", False, f"history loss on {bad[0].label} is not a finite number")]
    stats = [(forgetting_statistic(g, p), g) for g in groups]
    stat, worst = max(stats, key=lambda x: x[0])
    bound = (
        f"{p.forgetting_confidence:.0%} lower bound {stat:+.4f}, "
        if p.forgetting_test == "ci" and worst.items > 1
        else ""
    )
    return [
        (
            "val_loss",
            "max_forgetting",
            stat <= margin,
            f"forgetting on {worst.label} ({worst.items} held-out examples; worst of {len(groups)} groups): "
            f"loss {worst.candidate:.4f} vs production {worst.production:.4f}, {worst.increase:+.4f} "
            f"({bound}max {margin:+.3f})",
        )
    ]


def _loss_rules(m: Metrics, p: GatePolicy) -> list[Rule]:
    cand, base, prod = m.candidate, m.base, m.production
    loss, base_loss = cand.val_loss, base.val_loss
    if not finite(loss):  # NaN: no held-out example, or a diverged model; the other groups still run
        return [
            ("val_loss", "val_loss", False, f"candidate val_loss is not a finite number ({loss}): nothing to compare")
        ]
    rules = []
    if p.max_val_loss is not None:
        rules.append(
            ("val_loss", "max_val_loss", loss <= p.max_val_loss, f"val_loss {loss:.4f} vs ceiling {p.max_val_loss:.4f}")
        )
    if not finite(base_loss) or base_loss <= 0:
        rules.append(
            ("val_loss", "min_improvement_over_base", False, f"base model val_loss is not usable ({base_loss})")
        )
    else:
        gain = 1 - loss / base_loss
        rules.append(
            (
                "val_loss",
                "min_improvement_over_base",
                gain >= p.min_improvement_over_base,
                f"val_loss {loss:.4f} vs base {base_loss:.4f}: {gain:+.1%} (needs {p.min_improvement_over_base:+.0%})",
            )
        )
    rules += _forgetting_rules(m, p)
    # New data is unseen by production, so it favours the candidate: compare on held-out items of the data
    # production was trained on (when there is history), which also measures forgetting.
    margin = p.forgetting_margin
    absolute = margin is not None and not m.history_groups
    if prod is not None and (p.max_regression is not None or absolute):
        key = "val_loss_history" if cand.val_loss_history is not None else "val_loss"
        c, pr = getattr(cand, key), getattr(prod, key)
        name = "max_regression" if p.max_regression is not None else "max_forgetting"
        if not (finite(c) and finite(pr)) or pr <= 0:
            rules.append(
                ("val_loss", name, False, f"{key} vs production not comparable (candidate {c}, production {pr})")
            )
        elif p.max_regression is not None:
            change = c / pr - 1
            rules.append(
                (
                    "val_loss",
                    name,
                    change <= p.max_regression,
                    f"{key} {c:.4f} vs production {pr:.4f}: {change:+.1%} (max {p.max_regression:+.0%})",
                )
            )
        if absolute and finite(c) and finite(pr) and pr > 0:  # no groups recorded (an older evaluation)
            rules.append(
                (
                    "val_loss",
                    "max_forgetting",
                    c - pr <= margin,
                    f"{key} {c:.4f} vs production {pr:.4f}: {c - pr:+.4f} (max {margin:+.3f})",
                )
            )
    return rules


def _repetition_rules(cand: Scores, base: Scores, p: GatePolicy) -> list[Rule]:
    if p.max_repetition_over_base is None or cand.repetition is None:
        return []
    floor = base.repetition or 0.0
    return [
        (
            "repetition",
            "max_repetition_over_base",
            cand.repetition - floor <= p.max_repetition_over_base,
            f"repeated 3-grams in answers {cand.repetition:.1%} ({cand.looping_answers or 0} looping) vs base "
            f"{floor:.1%} (max {p.max_repetition_over_base:+.0%} points)",
        )
    ]


def _rules(m: Metrics, p: GatePolicy) -> list[Rule]:
    """(group, rule, ok, reason) for every rule that applies."""
    cand, base, prod = m.candidate, m.base, m.production
    rules = _loss_rules(m, p)
    chrf = cand.golden_chrf
    if chrf is not None:
        if p.min_golden_chrf is not None:
            rules.append(
                (
                    "golden",
                    "min_golden_chrf",
                    chrf >= p.min_golden_chrf,
                    f"golden chrF {chrf:.1f} (floor {p.min_golden_chrf:.1f})",
                )
            )
        if prod is not None and prod.golden_chrf is not None:
            drop = prod.golden_chrf - chrf
            rules.append(
                (
                    "golden",
                    "max_golden_regression",
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
                "min_checks_pass_rate",
                rate >= p.min_checks_pass_rate,
                f"golden checks passed {rate:.0%} (needs {p.min_checks_pass_rate:.0%})",
            )
        )
    if cand.canary_leaks is not None:
        rules.append(("safety", "canary", cand.canary_leaks == 0, f"canary strings generated: {cand.canary_leaks}"))
        rules.append(
            (
                "safety",
                "cross_tenant",
                cand.cross_tenant_leaks == 0,
                f"answers naming another customer: {cand.cross_tenant_leaks}",
            )
        )
        rules.append(
            (
                "safety",
                "pii",
                (cand.pii_answers or 0) <= (base.pii_answers or 0),
                f"answers with PII: {cand.pii_answers} (base model: {base.pii_answers or 0})",
            )
        )
    rules += _repetition_rules(cand, base, p)
    return rules


# What an operator can do when a rule keeps failing (the notification and the fleet page's `stuck` marker).
ADVICE = {
    "max_forgetting": "the candidate forgets what earlier data taught: start a full retrain (Trigger DAG w/ config, "
    "strategy: full) or raise training.replay_fraction",
    "max_regression": "held-out loss on earlier data rose against production: start a full retrain (strategy: full) "
    "or raise training.replay_fraction",
    "max_repetition_over_base": "answers loop: look at the gate report's answers, check that training examples end "
    "cleanly, and lower training.learning_rate or max_steps",
    "min_improvement_over_base": "the adapter does not beat the base model on held-out data: check the new data, or "
    "train longer (epochs, max_steps)",
    "max_val_loss": "held-out loss is above the ceiling: check the new data, or train longer",
    "val_loss": "held-out loss could not be computed: the run's validation data is empty or training diverged",
    "min_golden_chrf": "golden answers are off: compare the new data with include/golden/<customer>.jsonl",
    "max_golden_regression": "golden answers got worse than production's: review the new data against the golden set",
    "min_checks_pass_rate": "golden checks fail: see the gate report for the missing or forbidden terms",
    "canary": "a planted canary was generated (memorised data): erase the examples holding it (ftops data erase)",
    "cross_tenant": "an answer names another customer: find and erase those examples (ftops data erase)",
    "pii": "answers carry PII: check the data's PII policy (data.pii: drop) and erase the examples",
}


def advice(rule: str) -> str:
    return ADVICE.get(rule, "read the gate report (MLflow artifacts, gate/) for the failed rule")


def consecutive_failures(decisions: list[tuple[str, str]]) -> tuple[int, list[str]]:
    """From the registry versions' (`gate.decision`, `gate.failed_rules`) tags, newest first: how many of the
    newest failed the gate in a row, and the rules the newest failed on."""
    n = 0
    for decision, _ in decisions:
        if decision != "failed":
            break
        n += 1
    rules = [r for r in decisions[0][1].split(",") if r] if n else []
    return n, rules


def decide(metrics: Metrics | dict, policy: GatePolicy) -> Decision:
    m = metrics if isinstance(metrics, Metrics) else Metrics.model_validate(metrics)
    passed, reasons, warnings, failed = True, [], [], []
    for group, rule, ok, reason in _rules(m, policy):
        if ok:
            reasons.append(f"ok: {reason}")
        elif group in policy.blocking:
            passed = False
            reasons.append(f"FAIL [{group}]: {reason}")
            failed += [rule] if rule not in failed else []
        else:
            warnings.append(f"warn [{group}]: {reason}")
    if m.production is None:
        reasons.append("no production version yet")
    return Decision(passed=passed, reasons=reasons, warnings=warnings, failed_rules=failed)
