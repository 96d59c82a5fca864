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


def test_defaults_apply_and_customers_override_field_by_field(tmp_path):
    p = load_platform(write(tmp_path, "  - {id: acme, name: Acme, training: {learning_rate: 0.01}}\n"))
    acme = p.customer("acme")
    assert acme.training.epochs == 1 and acme.training.learning_rate == 0.01
    assert acme.lora.r == 8  # built-in default


@pytest.mark.parametrize("bad", ["Acme", "a", "../etc", "acme_co", "-acme", "x" * 64])
def test_bad_customer_id_is_rejected_naming_it(tmp_path, bad):
    with pytest.raises(ConfigError, match="invalid customer id"):
        load_platform(write(tmp_path, f"  - {{id: '{bad}', name: X}}\n"))
    with pytest.raises(ConfigError):
        check_customer_id(bad)


def test_missing_field_names_customer_and_field(tmp_path):
    with pytest.raises(ConfigError, match=r"customer acme: name: Field required"):
        load_platform(write(tmp_path, "  - {id: acme}\n"))


def test_wrong_type_and_unknown_field_are_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"customer acme: lora.r"):
        load_platform(write(tmp_path, "  - {id: acme, name: A, lora: {r: many}}\n"))
    with pytest.raises(ConfigError, match=r"customer acme: colour"):
        load_platform(write(tmp_path, "  - {id: acme, name: A, colour: red}\n"))


def test_unknown_base_model_and_duplicates_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="base_model 'huge' is not in base_models"):
        load_platform(write(tmp_path, "  - {id: acme, name: A, base_model: huge}\n"))
    with pytest.raises(ConfigError, match="listed twice"):
        load_platform(write(tmp_path, "  - {id: acme, name: A}\n  - {id: acme, name: B}\n"))


def test_unknown_customer_lookup_is_a_clear_error(tmp_path):
    p = load_platform(write(tmp_path, "  - {id: acme, name: A}\n"))
    with pytest.raises(ConfigError, match="unknown customer 'globex'"):
        p.customer("globex")


def test_shipped_customers_files_are_valid():
    from conftest import ROOT, TEST_CUSTOMERS

    assert len(load_platform(ROOT / "include" / "customers.yaml").customers) >= 3
    assert load_platform(TEST_CUSTOMERS).customers


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
