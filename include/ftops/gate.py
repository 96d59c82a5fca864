"""Gate: decide from measured metrics and the customer's policy whether a candidate may be promoted.

Pure and side-effect free: the decision and every reason are returned for the registry to record.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftops.config import GatePolicy


@dataclass
class Decision:
    passed: bool
    reasons: list[str]

    def as_tags(self) -> dict[str, str]:
        return {"gate.decision": "passed" if self.passed else "failed", "gate.reasons": " | ".join(self.reasons)}


def decide(metrics: dict, policy: GatePolicy) -> Decision:
    cand = metrics["candidate"]["val_loss"]
    base = metrics["base"]["val_loss"]
    prod = metrics.get("production", {}).get("val_loss")
    ok, reasons = True, []
    if cand != cand:  # NaN: nothing to score on
        return Decision(False, ["no held-out examples to score the candidate on"])
    if policy.max_val_loss is not None and cand > policy.max_val_loss:
        ok = False
        reasons.append(f"val_loss {cand:.4f} above the ceiling {policy.max_val_loss:.4f}")
    needed = base * (1 - policy.min_improvement_over_base)
    if cand > needed:
        ok = False
        reasons.append(
            f"val_loss {cand:.4f} does not beat the base model ({base:.4f}) by {policy.min_improvement_over_base:.0%}"
        )
    else:
        reasons.append(f"val_loss {cand:.4f} vs base {base:.4f}: {1 - cand / base:.1%} better")
    if prod is not None:
        allowed = prod * (1 + policy.max_regression)
        if cand > allowed:
            ok = False
            reasons.append(f"val_loss {cand:.4f} regresses on production {prod:.4f} beyond {policy.max_regression:.0%}")
        else:
            reasons.append(f"val_loss {cand:.4f} vs production {prod:.4f}: within {policy.max_regression:.0%}")
    else:
        reasons.append("no production version yet")
    return Decision(ok, reasons)
