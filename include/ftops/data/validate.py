"""Validate: the Great Expectations suite `include/expectations/chat_batch.json` over one batch.

Row-level expectations (roles alternate and end with the assistant, non-empty turns, length bounds)
quarantine the rows they reject with the suite's reason code; the batch-level expectation (share of
quarantined records) fails the run before any GPU time is spent. The result and a Data Docs page are
returned for the snapshot to keep and MLflow to log: in the data chain the page is Great Expectations' own Data
Docs (an ephemeral context with a filesystem site, `add_data_docs_site` + `build_data_docs`); the whole site is
kept with the dataset version under `data_docs/`.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import dataclass
from pathlib import Path

from ftops.config import DataPolicy
from ftops.data.clean import pii_detail, quarantine, scrub
from ftops.data.records import Batch

SUITE_PATH = Path(__file__).resolve().parents[2] / "expectations" / "chat_batch.json"


class ValidationFailed(RuntimeError):
    """The batch breaks a batch-level expectation; the message lists which."""


@dataclass
class Validation:
    success: bool
    failures: list[str]
    result: dict
    html: str
    docs: Path | None = None  # a Great Expectations Data Docs site, when one was built


def _fill(value, params: dict):
    if isinstance(value, dict) and set(value) == {"param"}:
        return params[value["param"]]
    return value


class Validator:
    """The suite over a stream of chunks: row-level expectations quarantine rows chunk by chunk (one Great
    Expectations context for the whole run), and `finish` checks the batch as a whole from compact per-row
    figures (a few bytes per row, so a million rows fit in tens of MB)."""

    def __init__(self, policy: DataPolicy, suite_path: Path = SUITE_PATH):
        import great_expectations as gx

        self.spec = json.loads(suite_path.read_text())
        params = {"max_tokens": policy.max_tokens, "min_kept_share": 1 - policy.max_quarantine_share}
        self.context = gx.get_context(mode="ephemeral")
        asset = self.context.data_sources.add_pandas("ftops").add_dataframe_asset("batch")
        self.definition = asset.add_batch_definition_whole_dataframe("whole")
        self.row_level = [e for e in self.spec["expectations"] if e["row_level"]]

        def suite(name: str, expectations: list[dict]):
            s = self.context.suites.add(gx.ExpectationSuite(name=name))
            for e in expectations:
                cls = gx.expectations.registry.get_expectation_impl(e["type"])
                s.add_expectation(cls(**{k: _fill(v, params) for k, v in e["kwargs"].items()}, meta=e.get("meta", {})))
            return s

        self.pii_policy = policy.pii
        self.rows_suite = suite(f"{self.spec['name']}_rows", self.row_level)
        self.suite = suite(self.spec["name"], self.spec["expectations"])
        self._roles: dict[str, int] = {}
        self._role_codes = array("i")
        self._min_chars = array("i")
        self._tokens = array("i")

    def rows(self, batch: Batch) -> Batch:
        """Quarantine this chunk's rows that break a row-level expectation, with the suite's reason code, and
        under `pii: drop` the rows that hold PII (the customer's contract: such rows are not accepted)."""
        import pandas as pd

        if self.pii_policy == "drop":
            self._drop_pii(batch)
        if not batch.examples:
            return batch
        roles = [",".join(m["role"] for m in ex.messages) for ex in batch.examples]
        min_chars = [min(len(m["content"].strip()) for m in ex.messages) for ex in batch.examples]
        tokens = [sum(len(m["content"].split()) for m in ex.messages) for ex in batch.examples]
        df = pd.DataFrame({"status": "kept", "roles": roles, "min_turn_chars": min_chars, "n_tokens": tokens})
        result = self.definition.get_batch(batch_parameters={"dataframe": df}).validate(
            self.rows_suite, result_format={"result_format": "COMPLETE"}
        )
        bad: dict[int, str] = {}
        for r, e in zip(result.results, self.row_level, strict=True):
            for idx in r.result.get("unexpected_index_list") or []:
                bad.setdefault(int(idx), f"{e['reason']}: {e['kwargs']['column']} fails {e['type']}")
        kept = []
        for i, ex in enumerate(batch.examples):
            if i in bad:
                quarantine(batch, ex, bad[i].split(":")[0], bad[i])
                continue
            kept.append(ex)
            self._role_codes.append(self._roles.setdefault(roles[i], len(self._roles)))
            self._min_chars.append(min_chars[i])
            self._tokens.append(tokens[i])
        batch.examples = kept
        return batch

    def _drop_pii(self, batch: Batch) -> None:
        kept = []
        for ex in batch.examples:
            _, counts = scrub(ex)
            if counts:
                for k, v in counts.items():
                    batch.pii[k] = batch.pii.get(k, 0) + v
                quarantine(batch, ex, "pii", pii_detail(counts))
            else:
                kept.append(ex)
        batch.examples = kept

    def finish(self, read: int, dropped: dict[str, int], docs_dir: Path | None = None) -> Validation:
        """The whole suite over the run: `status` is `kept` for every record read less those quarantined for
        what they are (duplicates of data already kept are not a broken upload, so they do not count; PII
        drops under `pii: drop` do)."""
        import numpy as np
        import pandas as pd

        bad = sum(n for reason, n in dropped.items() if not reason.startswith("duplicate_"))
        n, m = max(read, len(self._tokens)), len(self._tokens)
        ok = max(0, min(read - bad, n))
        status = pd.Categorical.from_codes(
            np.r_[np.zeros(ok, dtype=np.int8), np.ones(n - ok, dtype=np.int8)],
            categories=["kept", "quarantined"],
        )
        codes = np.full(n, -1, dtype=np.int32)
        codes[:m] = np.frombuffer(self._role_codes, dtype=np.int32) if m else codes[:0]
        pad = np.full(n - m, np.nan)
        df = pd.DataFrame(
            {
                "status": status,
                "roles": pd.Categorical.from_codes(codes, categories=list(self._roles) or ["-"]).astype(object),
                "min_turn_chars": np.r_[np.frombuffer(self._min_chars, dtype=np.int32).astype(float), pad],
                "n_tokens": np.r_[np.frombuffer(self._tokens, dtype=np.int32).astype(float), pad],
            }
        )
        if docs_dir is None:
            result = self.definition.get_batch(batch_parameters={"dataframe": df}).validate(
                self.suite, result_format={"result_format": "SUMMARY"}
            )
        else:
            result = self._checkpoint(df, Path(docs_dir))
        if broken := [r for r in result.results if raised(r.exception_info)]:
            # Not a verdict on the data: nothing may be rejected (or kept) on it. The task fails and retries.
            r = broken[0]
            raise RuntimeError(
                f"Great Expectations could not evaluate {r.expectation_config.type}"
                f"({r.expectation_config.kwargs.get('column')}): {_message(r.exception_info)}"
            )
        failures = [
            f"{r.expectation_config.type}({r.expectation_config.kwargs.get('column')}): "
            f"{r.result.get('unexpected_percent', 0):.1f}% unexpected"
            for r in result.results
            if not r.success and not _row_level(r, self.spec)
        ]
        report = result.to_json_dict()
        page = _html(report, self.spec)
        if docs_dir is not None:
            pages = sorted(Path(docs_dir).glob("validations/**/*.html"))
            page = pages[-1].read_text() if pages else page
        return Validation(success=not failures, failures=failures, result=report, html=page, docs=docs_dir)

    def _checkpoint(self, df, docs_dir: Path):
        """Validate through a Checkpoint whose action updates a filesystem Data Docs site at `docs_dir`, then
        build it: Great Expectations' own pages (suite, validation result, index), kept with the version."""
        import great_expectations as gx

        self.context.add_data_docs_site(
            site_name="ftops",
            site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            },
        )
        vd = self.context.validation_definitions.add(
            gx.ValidationDefinition(data=self.definition, suite=self.suite, name=self.spec["name"])
        )
        checkpoint = self.context.checkpoints.add(
            gx.Checkpoint(
                name="ftops",
                validation_definitions=[vd],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
                result_format={"result_format": "SUMMARY"},
            )
        )
        result = next(iter(checkpoint.run(batch_parameters={"dataframe": df}).run_results.values()))
        self.context.build_data_docs()
        return result


def validate(batch: Batch, policy: DataPolicy, suite_path: Path = SUITE_PATH) -> tuple[Batch, Validation]:
    """One batch in memory: quarantine rows that break row-level expectations, then check the batch as a whole."""
    v = Validator(policy, suite_path)
    batch = v.rows(batch)
    return batch, v.finish(batch.read, batch.dropped())


def raised(info) -> bool:
    """Whether an expectation's evaluation raised (GE records it, per expectation or per metric, and marks the
    expectation failed with no unexpected values: that must not read as a rejected batch)."""
    if not isinstance(info, dict):
        return False
    if "raised_exception" in info:
        return bool(info["raised_exception"])
    return any(raised(v) for v in info.values())


def _message(info: dict) -> str:
    if "raised_exception" in info:
        return str(info.get("exception_message"))
    return next(_message(v) for v in info.values() if raised(v))


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
