"""Retention across adapter versions: what each registry version's evaluation measured on the customer's
earlier data, read back from its tags (`VersionTags.forgetting_max`, `forgetting_groups`, written at registration by
`ftops.release.tasks.forgetting`), for the Adapters tab's chart and `ftops adapters show`.

Tags are input: a malformed value is left out (that version shows no figures), never trusted or raised on.
"""

from __future__ import annotations

from pydantic import ValidationError

from ftops.handoffs import HistoryGroup
from ftops.release.tags import VersionTags


def groups(tags: VersionTags) -> list[HistoryGroup]:
    out = []
    for g in (tags.forgetting_groups or [])[:64]:
        try:
            out.append(HistoryGroup.model_validate(g))
        except ValidationError:
            return []  # one malformed group: the version shows no figures rather than some
    return out


def version_forgetting(tags: VersionTags) -> dict:
    """One version's figures: the worst increase and every group's losses."""
    return {
        "max": tags.forgetting_max,
        "groups": [g.model_dump(exclude={"diff_sd"}) | {"label": g.label} for g in groups(tags)],
    }


def retention(versions: list[tuple[str, VersionTags]]) -> dict:
    """Per group of earlier data (a line, keyed by its first dataset version, so the customer's oldest data
    keeps one line however the groups are cut), each registry version's held-out loss on it, oldest version
    first; with production's loss at that version's evaluation, for comparison."""
    order = sorted(versions, key=lambda x: int(x[0]) if x[0].isdigit() else 0)
    series: dict[str, dict] = {}
    for version, tags in order:
        for g in groups(tags):
            s = series.setdefault(g.first, {"first": g.first, "label": g.label, "points": []})
            s["label"] = g.label  # the newest cut of this group
            s["points"].append(
                {"version": version, "loss": g.candidate, "production": g.production, "increase": g.increase}
            )
    return {
        "versions": [v for v, t in order if groups(t)],
        "forgetting_max": {v: t.forgetting_max for v, t in order},
        "series": sorted(series.values(), key=lambda s: s["first"]),
    }
