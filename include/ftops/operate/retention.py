"""Retention across adapter versions: what each registry version's evaluation measured on the customer's
earlier data, read back from its tags (`forgetting.max`, `forgetting.groups`, written at registration by
`ftops.release.tasks.forgetting_tags`), for the Adapters tab's chart and `ftops adapters show`.

Tags are input: a malformed value is left out (that version shows no figures), never trusted or raised on.
"""

from __future__ import annotations

import json
import math

from pydantic import ValidationError

from ftops.handoffs import HistoryGroup


def parse_groups(tag: str | None) -> list[HistoryGroup]:
    try:
        raw = json.loads(tag or "[]")
        return [HistoryGroup.model_validate(g) for g in raw[:64]] if isinstance(raw, list) else []
    except (ValueError, TypeError, ValidationError):
        return []


def _num(v: str | None) -> float | None:
    try:
        x = float(v) if v not in (None, "") else None
    except ValueError:
        return None
    return x if x is not None and math.isfinite(x) else None


def version_forgetting(tags: dict[str, str]) -> dict:
    """One version's figures: the worst increase and every group's losses."""
    groups = parse_groups(tags.get("forgetting.groups"))
    return {
        "max": _num(tags.get("forgetting.max")),
        "groups": [g.model_dump(exclude={"diff_sd"}) | {"label": g.label} for g in groups],
    }


def retention(versions: list[tuple[str, dict[str, str]]]) -> dict:
    """Per group of earlier data (a line, keyed by its first dataset version, so the customer's oldest data
    keeps one line however the groups are cut), each registry version's held-out loss on it, oldest version
    first; with production's loss at that version's evaluation, for comparison."""
    order = sorted(versions, key=lambda x: int(x[0]) if x[0].isdigit() else 0)
    series: dict[str, dict] = {}
    for version, tags in order:
        for g in parse_groups(tags.get("forgetting.groups")):
            s = series.setdefault(g.first, {"first": g.first, "label": g.label, "points": []})
            s["label"] = g.label  # the newest cut of this group
            s["points"].append(
                {"version": version, "loss": g.candidate, "production": g.production, "increase": g.increase}
            )
    return {
        "versions": [v for v, t in order if parse_groups(t.get("forgetting.groups"))],
        "forgetting_max": {v: _num(t.get("forgetting.max")) for v, t in order},
        "series": sorted(series.values(), key=lambda s: s["first"]),
    }
