"""Continual training on the tiny model, through the bench's own code path (`bench/continual.py`: the data chain,
`training_mix`, the training function, evaluation's held-out loss): over three weekly drops, each a new task,
replay and `init: production` forget less than continuing on the new data alone, on two seeds; and the
adaptive replay share follows the last candidate's forgetting within the customer's limits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from ftops.config import ConfigError, TrainingSettings

ROOT = Path(__file__).resolve().parents[1]


def bench():
    spec = importlib.util.spec_from_file_location("continual_bench", ROOT / "bench" / "continual.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_replay_and_init_production_reduce_forgetting(tmp_path):
    import torch

    from ftops.model.base_models import build_tiny

    torch.set_num_threads(1)  # see the bench's --threads
    c = bench()
    drops = c.generate_drops(tmp_path / "drops", 3, 60)
    texts = [line for p, _ in drops for line in p.read_text().splitlines()]
    model = str(build_tiny(tmp_path / "tiny", corpus=texts))
    common = {
        "epochs": 10,
        "max_steps": -1,
        "learning_rate": 2e-2,
        "batch_size": 8,
        "max_length": 128,
        "dpo_max_steps": 0,
        "save_steps": 10_000,
    }
    names = ["production_noreplay", "production_replay_0.5", "fresh_replay"]
    out = c.run(model, drops, names, common, [0, 1], tmp_path / "work", 0, 0.2, log=print)["strategies"]
    f = {n: out[n]["avg_forgetting_per_seed"] for n in names}
    print(f)
    # Every seed: continuing from production with half the mix replayed forgets clearly less than without replay.
    for seed in range(2):
        assert f["production_replay_0.5"][seed] < 0.6 * f["production_noreplay"][seed], f
    assert f["production_noreplay"][0] > 0.1 and f["production_noreplay"][1] > 0.1, f  # there was forgetting
    # init: production with replay keeps what it learned better than a fresh adapter with the old default replay.
    assert out["production_replay_0.5"]["avg_forgetting"] < out["fresh_replay"]["avg_forgetting"], out
    # Forgetting is measured on every earlier drop of every version: the matrix is lower-triangular and complete.
    assert [len(row) for row in out["production_noreplay"]["loss_matrix"]] == [1, 2, 3]


def test_adaptive_replay_share_follows_forgetting_within_limits():
    t = TrainingSettings.model_validate(
        {"replay": "adaptive", "replay_fraction": 0.2, "adaptive": {"min_fraction": 0.05, "max_fraction": 0.4}}
    )
    assert t.replay_share() == (0.2, "adaptive: no earlier share recorded, starting at 0.2")
    bound = t.adaptive.bound
    up, why = t.replay_share("0.2", str(bound * 3))
    assert up == 0.4 and "forgot" in why and ">" in why
    assert t.replay_share("0.4", str(bound * 3))[0] == 0.4  # capped at max_fraction
    assert t.replay_share("0.2", str(bound / 2))[0] == 0.1  # falls back when the candidate did not forget
    assert t.replay_share("0.05", "0")[0] == 0.05  # never below min_fraction
    # Tags are input: garbage, NaN or a missing figure keep the last share (unknown is not "no forgetting").
    for bad in (None, "", "nan", "inf", "lots"):
        share, why = t.replay_share("0.4", bad)
        assert share == 0.4 and "kept" in why
    assert t.replay_share("9", str(bound * 3))[0] == 0.4  # an out-of-range recorded share is clipped
    # A fixed share ignores the registry.
    fixed = TrainingSettings.model_validate({"replay": "fixed", "replay_fraction": 0.3})
    assert fixed.replay_share("0.05", "5")[0] == 0.3


def test_training_defaults_and_migration():
    d = TrainingSettings()
    # Chosen from bench/continual.py's table (README): continue from production, half of the mix replayed.
    assert d.init == "production" and d.replay == "fixed" and d.replay_share()[0] == 0.5
    # Existing customers' settings keep working: an explicit `init: fresh` still means fresh, a replay_fraction
    # alone still sets the share.
    old = TrainingSettings.model_validate({"init": "fresh", "replay_fraction": 0.2})
    assert old.init == "fresh" and old.replay_share() == (0.2, "fixed replay_fraction 0.2")
    with pytest.raises(ValueError):
        TrainingSettings.model_validate({"replay": "adaptive", "adaptive": {"min_fraction": 0.5, "max_fraction": 0.1}})
    with pytest.raises(ValueError):
        TrainingSettings.model_validate({"replay": "sometimes"})


def test_customers_file_accepts_adaptive_replay(tmp_path):
    from ftops.config import load_platform

    path = tmp_path / "customers.yaml"
    path.write_text(
        "base_models: {tiny: {path: tiny}}\n"
        "customers:\n"
        "  - {id: acme, name: Acme, base_model: tiny,\n"
        "     training: {replay: adaptive, adaptive: {min_fraction: 0.1, max_fraction: 0.3, bound: 0.05}}}\n"
        "  - {id: oldco, name: Old, base_model: tiny, training: {init: fresh, replay_fraction: 0.2}}\n"
        "  - {id: badco, name: Bad, base_model: tiny, training: {adaptive: {factor: 0.5}}}\n"
    )
    p = load_platform(path)
    assert p.customer("acme").training.adaptive.max_fraction == 0.3
    assert p.customer("oldco").training.init == "fresh" and p.customer("oldco").training.replay == "fixed"
    assert "badco" in p.invalid
    with pytest.raises(ConfigError):
        p.customer("badco")
