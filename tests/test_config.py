"""The customers file is validated once, with errors that name the customer and the field."""

from __future__ import annotations

import pytest

from ftops.config import ConfigError, check_customer_id, load_platform

BASE = """
base_models:
  tiny: {path: tiny-llama}
defaults:
  base_model: tiny
  training: {epochs: 1}
customers:
"""


def write(tmp_path, customers: str):
    path = tmp_path / "customers.yaml"
    path.write_text(BASE + customers)
    return path


def strict(path):
    """Load and fail on any invalid entry, as `ftops customers check` does."""
    platform = load_platform(path)
    platform.check()
    return platform


def test_defaults_apply_and_customers_override_field_by_field(tmp_path):
    p = strict(write(tmp_path, "  - {id: acme, name: Acme, training: {learning_rate: 0.01}}\n"))
    acme = p.customer("acme")
    assert acme.training.epochs == 1 and acme.training.learning_rate == 0.01
    assert acme.lora.r == 8  # built-in default


@pytest.mark.parametrize("bad", ["Acme", "a", "../etc", "acme_co", "-acme", "x" * 64])
def test_bad_customer_id_is_rejected_naming_it(tmp_path, bad):
    with pytest.raises(ConfigError, match="invalid customer id"):
        strict(write(tmp_path, f"  - {{id: '{bad}', name: X}}\n"))
    with pytest.raises(ConfigError):
        check_customer_id(bad)


def test_missing_field_names_customer_and_field(tmp_path):
    with pytest.raises(ConfigError, match=r"customer acme: name: Field required"):
        strict(write(tmp_path, "  - {id: acme}\n"))


def test_wrong_type_and_unknown_field_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"customer acme: lora.r"):
        strict(write(tmp_path, "  - {id: acme, name: A, lora: {r: many}}\n"))
    with pytest.raises(ConfigError, match=r"customer acme: colour"):
        strict(write(tmp_path, "  - {id: acme, name: A, colour: red}\n"))


def test_unknown_base_model_and_duplicates_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="base_model 'huge' is not in base_models"):
        strict(write(tmp_path, "  - {id: acme, name: A, base_model: huge}\n"))
    with pytest.raises(ConfigError, match="listed twice"):
        strict(write(tmp_path, "  - {id: acme, name: A}\n  - {id: acme, name: B}\n"))


def test_unknown_customer_lookup_is_a_clear_error(tmp_path):
    p = load_platform(write(tmp_path, "  - {id: acme, name: A}\n"))
    with pytest.raises(ConfigError, match="unknown customer 'globex'"):
        p.customer("globex")


def test_one_bad_entry_leaves_the_others_and_is_named(tmp_path):
    p = load_platform(
        write(
            tmp_path,
            "  - {id: acme, name: A}\n"
            "  - {id: globex, name: G, lora: {r: many}}\n"
            "  - {id: Bad_Id, name: X}\n"
            "  - 42\n"
            "  - {id: initech, name: I}\n"
            "  - {id: initech, name: I2}\n",
        )
    )
    assert sorted(p.customers) == ["acme"]  # initech listed twice: neither entry is trusted
    assert sorted(p.invalid) == ["#2", "#3", "globex", "initech"]
    assert "lora.r" in p.invalid["globex"] and "listed twice" in p.invalid["initech"]
    with pytest.raises(ConfigError, match="'globex' has an invalid entry"):
        p.customer("globex")
    with pytest.raises(ConfigError, match=r"globex: .*lora.r"):
        p.check()


@pytest.mark.parametrize("bad", ["Tiny", "../x", "a/b", "a..b", ""])
def test_bad_base_model_name_is_rejected(tmp_path, bad):
    path = tmp_path / "customers.yaml"
    path.write_text(f"base_models:\n  '{bad}': {{path: x}}\ncustomers: []\n")
    with pytest.raises(ConfigError, match="invalid base model name"):
        load_platform(path)


def test_registered_model_names_cannot_collide():
    from ftops.release.registry import model_name

    pairs = [("acme", "x-y"), ("acme-x", "y"), ("acme", "x.y"), ("acme-x", "y.z"), ("acme-x-y", "z")]
    names = [model_name(c, b) for c, b in pairs]
    assert len(set(names)) == len(names)
    assert model_name("acme", "x-y") == "ftops.acme.x-y"  # readable: customer, then base model


def test_shipped_customers_files_are_valid():
    from conftest import ROOT, TEST_CUSTOMERS

    assert len(strict(ROOT / "include" / "customers.yaml").customers) >= 3
    assert strict(TEST_CUSTOMERS).customers


def test_run_overrides_are_validated_and_epochs_lift_the_step_cap():
    from pydantic import ValidationError

    from ftops.config import TrainingSettings

    capped = TrainingSettings(max_steps=36, epochs=3)
    by_epochs = capped.overridden({"epochs": 2})
    assert (by_epochs.epochs, by_epochs.max_steps) == (2, -1)
    assert capped.overridden({"epochs": 2, "max_steps": 5}).max_steps == 5
    assert capped.overridden({"learning_rate": 1e-3}).max_steps == 36
    with pytest.raises(ValidationError):
        capped.overridden({"learning_rate": -1})


def test_cli_check_names_the_invalid_entry(tmp_path):
    import os
    import subprocess

    from conftest import ROOT

    path = write(tmp_path, "  - {id: acme, name: A}\n  - {id: globex, name: G, gate: {blocking: [vibes]}}\n")
    env = dict(os.environ, FTOPS_CUSTOMERS=str(path))
    out = subprocess.run([ROOT / ".venv/bin/ftops", "customers", "check"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "globex" in out.stderr and "gate.blocking" in out.stderr, out.stderr
    env["FTOPS_CUSTOMERS"] = str(write(tmp_path, "  - {id: acme, name: A}\n"))
    out = subprocess.run([ROOT / ".venv/bin/ftops", "customers", "check"], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "1 customers, all valid" in out.stdout
