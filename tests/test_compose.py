"""Offline check of docker-compose.yaml, the production-like stack.

No Docker engine runs on these machines, so the stack is never started here. Instead the file is parsed and
validated by the Compose-specification parser of the `compose-spec` package (Python bindings of the Rust
`compose_spec` crate), after the variable interpolation Compose itself does first, and then checked for what
the platform relies on: the services, GPU vLLM replicas with runtime LoRA, and engine limits that fit every
customer in include/customers.yaml.
"""

import re
import shlex
from pathlib import Path

import pytest
import yaml
from compose_spec import PyOptions

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yaml").read_text()
# $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR
VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?::?-([^}]*))?\}|(\w+))")


def interpolate(text: str) -> str:
    """What `docker compose` does before validating, with no variable set: every default taken, `$$` -> `$`."""
    return VARIABLE.sub(lambda m: "$" if m[1] else (m[3] or ""), text)


def validated(text: str) -> dict:
    compose = PyOptions(apply_merge=True).from_yaml(interpolate(text))  # apply YAML merge keys (`<<: *anchor`)
    compose.validate()
    return compose.to_dict()


@pytest.fixture(scope="module")
def services() -> dict:
    return validated(COMPOSE_TEXT)["services"]


def args(service: dict) -> list[str]:
    command = service.get("command") or []
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def flag(argv: list[str], name: str) -> str:
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not set in {argv}")


def env(service: dict) -> dict:
    e = service.get("environment") or {}
    return dict(item.split("=", 1) for item in e) if isinstance(e, list) else e


def vllm_replicas(services: dict) -> dict:
    return {name: s for name, s in services.items() if s.get("image", "").startswith("vllm/vllm-openai")}


def test_compose_file_is_valid_and_references_resolve():
    spec = validated(COMPOSE_TEXT)
    assert "version" not in spec, "the top-level `version` key is obsolete"
    named_volumes = set(spec.get("volumes") or {})
    for name, service in spec["services"].items():
        assert set(service.get("depends_on") or []) <= set(spec["services"]), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            assert source.startswith((".", "/")) or source in named_volumes, f"{name}: undeclared volume {source}"


@pytest.mark.parametrize(
    "old, new",
    [
        ("    image: postgres:16\n", "    image: postgres:16\n    restart_policy: always\n"),  # unknown key
        ("      retries: 5\n", "      retries: five\n"),  # wrong type
        ("capabilities: [gpu]", "capabilities: gpu"),  # wrong type (a set is expected)
        ("image: postgres:16", "image: postgres:16 latest"),  # invalid image reference
    ],
)
def test_validator_rejects_a_broken_file(old, new):
    broken = COMPOSE_TEXT.replace(old, new, 1)
    assert broken != COMPOSE_TEXT, f"{old!r} not found in docker-compose.yaml"
    with pytest.raises(ValueError):
        validated(broken)


def test_stack_has_the_expected_services(services):
    airflow = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"}
    assert {"postgres", "s3", "mlflow"} | airflow <= set(services)
    assert len(vllm_replicas(services)) >= 2


def test_vllm_replicas_serve_every_customer_adapter_on_a_gpu(services):
    customers = yaml.safe_load((ROOT / "include" / "customers.yaml").read_text())
    ranks = [customers["defaults"]["lora"]["r"]]
    ranks += [c["lora"]["r"] for c in customers["customers"] if "r" in (c.get("lora") or {})]
    for name, replica in vllm_replicas(services).items():
        argv = args(replica)
        assert "--enable-lora" in argv, name
        assert env(replica).get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in {"true", "1"}, name
        devices = replica.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        assert any("gpu" in d.get("capabilities", []) for d in devices), f"{name}: no GPU reservation"
        assert int(flag(argv, "--max-lora-rank")) >= max(ranks), name
        assert int(flag(argv, "--max-cpu-loras")) >= len(customers["customers"]), name


def test_airflow_trains_against_the_model_vllm_serves(services):
    """The filesystem LoRA resolver needs the adapter's base_model_name_or_path (the path the trainer loaded) to
    equal vLLM's --model; and the reconciler must know every replica."""
    customers = yaml.safe_load((ROOT / "include" / "customers.yaml").read_text())
    base = customers["base_models"][customers["defaults"]["base_model"]]["path"]
    airflow = env(services["airflow-scheduler"])
    for name, replica in vllm_replicas(services).items():
        assert flag(args(replica), "--model") == f"{airflow['FTOPS_MODELS_DIR']}/{base}", name
        assert f"http://{name}:8000" in airflow["FTOPS_VLLM_URLS"].split(","), name
