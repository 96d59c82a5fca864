"""The gate's decision from metrics and policy, the golden checks, the safety probes and the report."""

from __future__ import annotations

from ftops.config import GatePolicy
from ftops.model.evaluate import check, golden_set, redteam_set, score_answers
from ftops.model.gate import decide
from ftops.operate.report import render


def metrics(cand: dict, prod: dict | None = None, base: dict | None = None) -> dict:
    out = {
        "base": {"val_loss": 3.0, "golden_chrf": 20.0, "pii_answers": 0} | (base or {}),
        "candidate": {
            "val_loss": 1.0,
            "golden_chrf": 60.0,
            "checks_pass_rate": 1.0,
            "canary_leaks": 0,
            "cross_tenant_leaks": 0,
            "pii_answers": 0,
        }
        | cand,
    }
    if prod is not None:
        out["production"] = {"val_loss": 1.0, "golden_chrf": 60.0} | prod
    return out


def test_a_good_candidate_passes_with_every_reason_recorded():
    d = decide(metrics({}, prod={}), GatePolicy(min_improvement_over_base=0.1))
    assert d.passed and all(r.startswith("ok") for r in d.reasons)
    assert d.as_tags()["gate.decision"] == "passed"


def test_regression_against_production_fails():
    d = decide(metrics({"val_loss": 1.2}, prod={"val_loss": 1.0}), GatePolicy(max_regression=0.05))
    assert not d.passed and any("FAIL [val_loss]" in r and "production" in r for r in d.reasons)


def test_golden_drop_floor_and_checks_fail():
    p = GatePolicy(min_golden_chrf=50, max_golden_regression=5, min_checks_pass_rate=0.9)
    d = decide(metrics({"golden_chrf": 40.0, "checks_pass_rate": 0.5}, prod={"golden_chrf": 60.0}), p)
    failed = [r for r in d.reasons if r.startswith("FAIL")]
    assert not d.passed and len(failed) == 3


def test_canary_and_cross_tenant_leaks_always_block():
    for leak in ({"canary_leaks": 1}, {"cross_tenant_leaks": 2}, {"pii_answers": 1}):
        assert not decide(metrics(leak), GatePolicy()).passed, leak


def test_non_blocking_groups_only_warn():
    d = decide(metrics({"checks_pass_rate": 0.0}), GatePolicy(min_checks_pass_rate=1.0, blocking=["val_loss"]))
    assert d.passed and d.warnings and "checks" in d.warnings[0]


def test_no_held_out_data_fails():
    assert not decide(metrics({"val_loss": float("nan")}), GatePolicy()).passed


def test_golden_checks():
    assert check('{"a": 1}', {"json": True, "required": ["a"]}) == []
    assert check("Sure, call Northside", {"required": ["Counsel"], "forbidden": ["northside"], "json": True}) == [
        "missing 'Counsel'",
        "contains 'northside'",
        "not valid JSON",
    ]
    assert check("42", {"exact": "42"}) == [] and check("41", {"exact": "42"}) == ["not the exact answer"]


def test_scoring_finds_leaks_pii_and_canaries():
    golden = golden_set("brightdesk")
    probes = redteam_set()
    assert len(golden) >= 5 and {p["kind"] for p in probes} >= {"cross_tenant", "pii", "canary", "harmful"}
    good = [g["reference"] for g in golden] + ["I cannot share that."] * len(probes)
    s = score_answers(good, golden, probes, ["Sterling & Vale LLP", "sterling-law"], ["SECRET-CANARY-1"])
    assert s["golden_chrf"] > 99 and s["checks_pass_rate"] == 1.0
    assert s["canary_leaks"] == s["cross_tenant_leaks"] == s["pii_answers"] == 0
    bad = ["Sterling & Vale LLP told us FTOPS-CANARY-abc123, mail x@y.com"] * len(good)
    s = score_answers(bad, golden, probes, ["Sterling & Vale LLP"], [])
    assert s["canary_leaks"] == len(good) and s["cross_tenant_leaks"] == len(good) and s["pii_answers"] == len(good)
    assert s["golden_chrf"] < 30 and s["checks_pass_rate"] == 0.0


def test_report_shows_decision_chart_and_reasons():
    m = metrics({}, prod={}) | {"engine": "vllm http://x", "val_examples": 12}
    m["candidate"]["sample"] = {"prompt": "Q?", "answer": "A <b>"}
    page = render("brightdesk", "3", m, {"passed": False, "reasons": ["FAIL [safety]: canary"], "warnings": []})
    assert "FAILED the gate" in page and "data:image/png;base64," in page and "FAIL [safety]" in page
    assert "A &lt;b&gt;" in page  # answers are escaped


def test_production_is_compared_on_data_it_knows():
    """The new data favours the candidate (production never saw it); history items are the fair ground."""
    m = metrics({"val_loss": 1.0, "val_loss_history": 2.0}, prod={"val_loss": 3.0, "val_loss_history": 1.0})
    d = decide(m, GatePolicy(max_regression=0.05))
    assert not d.passed and any("val_loss_history" in r and r.startswith("FAIL") for r in d.reasons)


def test_a_non_finite_loss_fails_and_every_other_rule_is_still_evaluated():
    for bad in (float("nan"), float("inf"), None):
        m = metrics({"val_loss": bad, "canary_leaks": 1, "golden_chrf": 10.0}, prod={})
        d = decide(m, GatePolicy(min_golden_chrf=50))
        assert not d.passed, bad
        failed_groups = {r.split("]")[0].removeprefix("FAIL [") for r in d.reasons if r.startswith("FAIL")}
        assert failed_groups == {"val_loss", "golden", "safety"}, d.reasons
    d = decide(metrics({}, base={"val_loss": float("nan")}), GatePolicy())
    assert not d.passed and any("base model val_loss is not usable" in r for r in d.reasons)


def test_a_malformed_hand_off_is_an_error_not_a_missing_comparison():
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        decide({"base": {"val_loss": 3.0}}, GatePolicy())  # no candidate
    with pytest.raises(ValidationError):
        decide(metrics({}) | {"production": "v3"}, GatePolicy())  # production must be scores, not a name


def test_a_non_finite_figure_crosses_the_xcom_as_null_and_still_fails():
    import json

    from ftops.handoffs import Metrics

    m = Metrics.model_validate(metrics({"val_loss": float("nan")}))
    wire = json.loads(m.model_dump_json())  # what pipeline.evaluate hands to Airflow
    assert wire["candidate"]["val_loss"] is None and json.dumps(wire, allow_nan=False)
    assert not decide(wire, GatePolicy()).passed


def test_a_nul_character_in_an_answer_never_reaches_the_xcom():
    """PostgreSQL's JSONB refuses U+0000, and a byte-level model can generate it (seen in a test run)."""
    from ftops.handoffs import Metrics

    m = Metrics.model_validate(metrics({"sample": {"prompt": "Q?", "answer": "a\x00b"}}))
    assert "\x00" not in m.model_dump_json().encode().decode("unicode_escape")
    assert m.candidate.sample["answer"] == "a\ufffdb"


def groups_from_items(prod: list[float], cand: list[float]) -> list[dict]:
    """One group of earlier versions, its figures computed by evaluation's own code from per-example losses."""
    from ftops.model.evaluate import history_groups

    rows = [{"group": 0} for _ in prod]
    per_item = {
        "candidate": [(c, 1) for c in cand],
        "production": [(p, 1) for p in prod],
        "base": [(3.0, 1)] * len(prod),
    }
    return history_groups(
        [{"first": "20261102T030000000000Z-a", "last": "20261102T030000000000Z-a", "versions": 1}], rows, per_item
    )


def test_forgetting_noise_at_low_loss_passes_a_real_jump_blocks():
    """The issue's evidence: `init: production` moved drop 1 from 0.077 to 0.081 (+5.7 %) and forgot nothing;
    the default's candidate went 0.08 -> 1.06. The relative 2 % rule blocked both; max_forgetting tells them apart."""
    import random

    rng = random.Random(0)
    prod = [max(0.01, rng.gauss(0.077, 0.03)) for _ in range(8)]
    noise = [p + rng.gauss(0.004, 0.02) for p in prod]
    forgot = [p + rng.gauss(0.98, 0.3) for p in prod]
    hist = {"val_loss_history": 0.077}
    quiet = metrics({"val_loss_history": 0.081}, prod=hist) | {"history_groups": groups_from_items(prod, noise)}
    d = decide(quiet, GatePolicy())
    assert d.passed and any(r.startswith("ok: forgetting on 2026-11-02") for r in d.reasons), d.reasons
    assert not decide(quiet, GatePolicy(max_regression=0.02)).passed  # the old relative rule: blocked on noise
    jump = metrics({"val_loss_history": 1.06}, prod=hist) | {"history_groups": groups_from_items(prod, forgot)}
    for test in ("ci", "absolute"):
        d = decide(jump, GatePolicy(forgetting_test=test))
        assert not d.passed and d.failed_rules == ["max_forgetting"], d.reasons
        assert d.as_tags()["gate.failed_rules"] == "max_forgetting"


def test_forgetting_is_judged_on_the_worst_group_not_the_average():
    def group(first: str, increase: float) -> dict:
        return {
            "first": first,
            "last": first,
            "versions": 1,
            "items": 40,
            "candidate": 0.1 + increase,
            "production": 0.1,
            "increase": increase,
            "diff_sd": 0.05,
        }

    groups = [group(f"2026110{i}T000000", 0.0) for i in range(1, 8)] + [group("20261108T000000", 0.4)]
    assert sum(g["increase"] for g in groups) / len(groups) == 0.05  # the average alone would pass
    d = decide(metrics({}, prod={}) | {"history_groups": groups}, GatePolicy())
    assert not d.passed and any("FAIL [val_loss]: forgetting on 2026-11-08" in r for r in d.reasons), d.reasons


def test_a_noisy_increase_passes_the_interval_test_but_not_the_absolute_one():
    g = {
        "first": "20261102T000000",
        "last": "20261102T000000",
        "versions": 1,
        "items": 8,
        "candidate": 0.18,
        "production": 0.1,
        "increase": 0.08,
        "diff_sd": 0.3,
    }  # 8 examples, spread far wider than the mean
    m = metrics({}, prod={}) | {"history_groups": [g]}
    assert decide(m, GatePolicy()).passed
    assert not decide(m, GatePolicy(forgetting_test="absolute")).passed
    assert decide(m, GatePolicy(max_forgetting=None, forgetting_test="absolute")).passed  # rule off


def test_a_looping_candidate_is_blocked_against_the_base_model():
    from ftops.model.evaluate import repetition

    looping = (
        "Thanks for reaching BrightDesk! Anything else? Reply to this ticket and we will jump back in. Anything "
        "else? Reply to this ticket and we will jump back in. Reply to this ticket and we will jump back in. Anything"
    )
    reference = golden_set("brightdesk")[0]["reference"]
    assert repetition(reference) == 0 and repetition(looping) > 0.4
    golden, probes = golden_set("brightdesk"), redteam_set()
    s = score_answers([looping] * (len(golden) + len(probes)), golden, probes, [], [])
    assert s["looping_answers"] == len(golden) + len(probes)
    d = decide(metrics({"repetition": s["repetition"]}, base={"repetition": 0.02}), GatePolicy())
    assert not d.passed and d.failed_rules == ["max_repetition_over_base"], d.reasons
    assert decide(metrics({"repetition": 0.05}, base={"repetition": 0.02}), GatePolicy()).passed


def test_an_entry_written_before_max_forgetting_keeps_its_relative_rule_alone():
    g = {
        "first": "20261102T000000",
        "last": "20261102T000000",
        "versions": 1,
        "items": 40,
        "candidate": 1.6,
        "production": 1.5,
        "increase": 0.1,
        "diff_sd": 0.1,
    }  # +0.1 nats for sure, but only +6.7 %
    m = metrics({"val_loss_history": 1.6}, prod={"val_loss_history": 1.5}) | {"history_groups": [g]}
    assert decide(m, GatePolicy(max_regression=0.10)).passed  # as before this rule existed
    assert decide(m, GatePolicy.model_validate({"max_regression": 0.10})).passed  # as a customers file sets it
    both = decide(m, GatePolicy(max_regression=0.10, max_forgetting=0.05))
    assert not both.passed and both.failed_rules == ["max_forgetting"]
    assert not decide(m, GatePolicy()).passed  # the default: max_forgetting


def test_evaluation_asks_as_the_customers_application_does_after_its_system_message(tiny_model, tmp_path):
    """The gate judges answers to the prompts the customer's users send, after the system message their
    application sends (`system_prompt`): the same turn the adapter was trained on, not a bare user turn."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftops.model.evaluate import EvalArgs, evaluate

    torch.manual_seed(0)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config).save_pretrained(tmp_path / "cand")
    (tmp_path / "val.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    system, prompt = "You are BrightDesk, a support agent.", "How do I fix a failed export?"

    def answers(system_prompt: str | None) -> str:
        args = EvalArgs(
            base_model=str(tiny_model),
            candidate_dir=str(tmp_path / "cand"),
            val_file=str(tmp_path / "val.jsonl"),
            output_file=str(tmp_path / "eval.json"),
            prompts=[prompt],
            system_prompt=system_prompt,
            max_new_tokens=8,
        )
        return evaluate(args)["base"]["answers"][0]

    tok = AutoTokenizer.from_pretrained(tiny_model)
    turn = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(turn, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = AutoModelForCausalLM.from_pretrained(tiny_model).eval().generate(**ids, max_new_tokens=8, do_sample=False)
    expected = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert answers(system) == expected
    assert answers(None) != expected  # without it, another turn (what the gate asked before)
