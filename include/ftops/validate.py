"""Validate: the Great Expectations suite `include/expectations/chat_batch.json` over one batch.

Row-level expectations (roles alternate and end with the assistant, non-empty turns, length bounds)
quarantine the rows they reject with the suite's reason code; the batch-level expectation (share of
quarantined records) fails the run before any GPU time is spent. The result and a Data Docs page are
returned for the snapshot to keep and MLflow to log.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ftops.config import DataPolicy
from ftops.ingest import Batch

SUITE_PATH = Path(__file__).resolve().parents[1] / "expectations" / "chat_batch.json"


class ValidationFailed(RuntimeError):
    """The batch breaks a batch-level expectation; the message lists which."""


@dataclass
class Validation:
    success: bool
    failures: list[str]
    result: dict
    html: str


def _fill(value, params: dict):
    if isinstance(value, dict) and set(value) == {"param"}:
        return params[value["param"]]
    return value


def _frame(batch: Batch):
    import pandas as pd

    rows = [
        {
            "status": "kept",
            "roles": ",".join(m["role"] for m in ex.messages),
            "min_turn_chars": min(len(m["content"].strip()) for m in ex.messages),
            "n_tokens": sum(len(m["content"].split()) for m in ex.messages),
        }
        for ex in batch.examples
    ]
    rows += [
        {"status": "quarantined", "roles": None, "min_turn_chars": None, "n_tokens": None} for _ in batch.quarantine
    ]
    return pd.DataFrame(rows, columns=["status", "roles", "min_turn_chars", "n_tokens"])


def validate(batch: Batch, policy: DataPolicy, suite_path: Path = SUITE_PATH) -> tuple[Batch, Validation]:
    """Quarantine rows that break row-level expectations, then check the batch as a whole."""
    import great_expectations as gx

    spec = json.loads(suite_path.read_text())
    params = {"max_tokens": policy.max_tokens, "min_kept_share": 1 - policy.max_quarantine_share}
    context = gx.get_context(mode="ephemeral")
    asset = context.data_sources.add_pandas("ftops").add_dataframe_asset("batch")
    definition = asset.add_batch_definition_whole_dataframe("whole")

    def run(df, expectations):
        suite = context.suites.add_or_update(gx.ExpectationSuite(name=spec["name"]))
        for e in expectations:
            cls = gx.expectations.registry.get_expectation_impl(e["type"])
            suite.add_expectation(cls(**{k: _fill(v, params) for k, v in e["kwargs"].items()}, meta=e.get("meta", {})))
        return definition.get_batch(batch_parameters={"dataframe": df}).validate(
            suite, result_format={"result_format": "COMPLETE"}
        )

    row_level = [e for e in spec["expectations"] if e["row_level"]]
    kept_rows = _frame(Batch(examples=batch.examples))
    if len(kept_rows):
        result = run(kept_rows, row_level)
        bad: dict[int, str] = {}
        for r, e in zip(result.results, row_level, strict=True):
            for idx in r.result.get("unexpected_index_list") or []:
                bad.setdefault(int(idx), f"{e['reason']}: {e['kwargs']['column']} fails {e['type']}")
        examples = []
        for i, ex in enumerate(batch.examples):
            if i in bad:
                batch.drop(ex, bad[i].split(":")[0], bad[i])
            else:
                examples.append(ex)
        batch.examples = examples

    result = run(_frame(batch), spec["expectations"])
    failures = [
        f"{r.expectation_config.type}({r.expectation_config.kwargs.get('column')}): "
        f"{r.result.get('unexpected_percent', 0):.1f}% unexpected"
        for r in result.results
        if not r.success and not _row_level(r, spec)
    ]
    report = result.to_json_dict()
    return batch, Validation(success=not failures, failures=failures, result=report, html=_html(report, spec))


def _row_level(r, spec) -> bool:
    return any(
        e["row_level"]
        and e["type"] == r.expectation_config.type
        and e["kwargs"]["column"] == r.expectation_config.kwargs.get("column")
        for e in spec["expectations"]
    )


def _html(report: dict, spec: dict) -> str:
    """A static validation page (Data Docs need a filesystem site; this renders the same result offline)."""
    rows = "".join(
        f"<tr><td>{'✔' if r['success'] else '✘'}</td><td>{r['expectation_config']['type']}</td>"
        f"<td>{r['expectation_config']['kwargs'].get('column', '')}</td>"
        f"<td>{r['result'].get('element_count', '')}</td><td>{r['result'].get('unexpected_count', '')}</td></tr>"
        for r in report["results"]
    )
    return (
        f"<html><head><meta charset='utf-8'><title>{spec['name']}</title></head><body>"
        f"<h1>Validation of suite {spec['name']}: {'passed' if report['success'] else 'FAILED'}</h1>"
        f"<p>{spec['description']}</p><table border=1><tr><th></th><th>expectation</th><th>column</th>"
        f"<th>rows</th><th>unexpected</th></tr>{rows}</table></body></html>"
    )
