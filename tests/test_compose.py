"""Offline check of docker-compose.yaml, the production-like stack.

No Docker engine runs on these machines, so the stack is never started here. Instead the file is parsed and
validated by the Compose-specification parser of the `compose-spec` package (Python bindings of the Rust
`compose_spec` crate), after the variable interpolation Compose itself does first, and then checked for what
the platform relies on: the services, GPU vLLM replicas with runtime LoRA, and engine limits that fit every
customer in include/customers.yaml.
"""

import json
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from compose_spec import PyOptions

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yaml").read_text()
# $$ (a literal $), ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}, $VAR
VARIABLE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?-)([^}]*)|(:?\?)([^}]*))?\}|(\w+))")


def dotenv(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


EXAMPLE_ENV = dotenv(ROOT / ".env.example")


class MissingVariable(ValueError):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """What `docker compose` does before validating: variables from `env` (an .env file), defaults taken,
    `${VAR:?message}` an error when VAR is unset or empty, `$$` -> `$`."""

    def sub(m: re.Match) -> str:
        if m[1]:
            return "$"
        name = m[2] or m[7]
        value = env.get(name)
        if m[5] is not None and (value is None or (m[5] == ":?" and value == "")):
            raise MissingVariable(f"{name}: {m[6]}")
        if m[3] is not None and (value is None or (m[3] == ":-" and value == "")):
            return m[4]
        return value or ""

    return VARIABLE.sub(sub, text)


def validated(text: str, env: dict[str, str] | None = None) -> dict:
    rendered = interpolate(text, EXAMPLE_ENV if env is None else env)
    compose = PyOptions(apply_merge=True).from_yaml(rendered)  # apply YAML merge keys (`<<: *anchor`)
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


REQUIRED = sorted(set(re.findall(r"\$\{(\w+):\?", COMPOSE_TEXT)))


def test_every_secret_is_required_and_documented():
    """No secret has a default any more: each is `${VAR:?...}`, listed in .env.example, and made by
    scripts/make_env.py."""
    defaults = re.findall(r"\$\{(\w+):?-", COMPOSE_TEXT)
    assert not [v for v in defaults if re.search(r"PASSWORD|SECRET|KEY|TOKEN", v)], defaults
    for name in (
        "AIRFLOW_JWT_SECRET",
        "AIRFLOW_FERNET_KEY",
        "AIRFLOW_DB_PASSWORD",
        "MLFLOW_DB_PASSWORD",
        "FTOPS_AIRFLOW_ADMIN_PASSWORD",
        "FTOPS_S3_ACCESS_KEY",
        "FTOPS_S3_SECRET_KEY",
        "FTOPS_SERVING_ADMIN_KEY",
    ):
        assert name in REQUIRED, name
    assert set(REQUIRED) <= set(EXAMPLE_ENV), set(REQUIRED) - set(EXAMPLE_ENV)
    assert "admin:admin" not in COMPOSE_TEXT.replace("SIMPLE_AUTH_MANAGER_USERS: admin:admin", "")


def test_the_customer_api_reaches_airflow_as_its_own_service_account_not_the_admin(services):
    api = env(services["api"])
    users = dict(
        u.split(":") for u in env(services["airflow-scheduler"])["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(",")
    )
    assert api["FTOPS_AIRFLOW_USERNAME"] == "ftops-api" and users["ftops-api"] == "user"  # trigger/cancel, no admin
    init = " ".join(services["airflow-init"]["command"])
    assert '"ftops-api": os.environ["FTOPS_AIRFLOW_API_PASSWORD"]' in init  # its password lands in the file


@pytest.mark.parametrize("name", REQUIRED)
def test_compose_refuses_to_render_without_a_secret(name):
    for env in ({k: v for k, v in EXAMPLE_ENV.items() if k != name}, EXAMPLE_ENV | {name: ""}):
        with pytest.raises(MissingVariable, match=name):
            validated(COMPOSE_TEXT, env)


def test_generated_env_renders_the_stack(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_env.py"), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    values = dotenv(tmp_path / ".env")
    assert set(REQUIRED) <= set(values) and len(set(values.values())) == len(values)  # every secret distinct
    assert all(len(v) >= 16 and "example" not in v for v in values.values())
    assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600
    for f in ("s3.json", "mlflow_auth.ini", "customer_upload_keys.json"):
        assert stat.S_IMODE((tmp_path / "secrets" / f).stat().st_mode) == 0o600
    for v in values.values():
        assert v not in r.stdout + r.stderr  # nothing secret printed
    services = validated(COMPOSE_TEXT, values)["services"]
    assert env(services["airflow-scheduler"])["AIRFLOW__API_AUTH__JWT_SECRET"] == values["AIRFLOW_JWT_SECRET"]
    assert env(services["api"])["FTOPS_AIRFLOW_PASSWORD"] == values["FTOPS_AIRFLOW_API_PASSWORD"]  # not the admin's
    again = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_env.py"), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert again.returncode != 0 and "exists" in again.stderr  # never silently replaces a stack's secrets


def test_vllm_replicas_enforce_tenant_keys(services):
    for name, replica in vllm_replicas(services).items():
        assert flag(args(replica), "--middleware") == "ftops.release.serving_auth.TenantAuth", name
        e = env(replica)
        assert e["FTOPS_SERVING_BASE_MODEL"] == flag(args(replica), "--model"), name
        assert e["FTOPS_SERVING_ADMIN_KEY"] and e["PYTHONPATH"] == "/opt/ftops/include", name
    assert "--app-name" in args(services["mlflow"]) and flag(args(services["mlflow"]), "--app-name") == "basic-auth"


def gpus(service: dict) -> list:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if "gpu" in d.get("capabilities", [])]


def test_every_built_image_has_its_dockerfile_and_every_mounted_path_exists(services):
    built = {name: s["build"] for name, s in services.items() if "build" in s}
    assert "airflow-worker-gpu" in built and "airflow-scheduler" in built
    for name, build in built.items():
        context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = context / ("Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
        assert dockerfile.is_file(), f"{name}: {dockerfile} is not in the repository"
        text = dockerfile.read_text()
        assert re.search(r"^FROM apache/airflow:3\.3\.2-python3\.11$", text, re.M), dockerfile
        for src in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):  # what it copies exists too
            for path in src.split():
                assert (context / path).exists(), f"{dockerfile} copies {path}, which does not exist"
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is not in the repository"


def test_celery_workers_route_training_to_the_gpu_and_nothing_else_gets_one(services):
    env_of = env(services["airflow-scheduler"])
    assert env_of["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    broker = env_of["AIRFLOW__CELERY__BROKER_URL"]
    assert broker.startswith("redis://:") and broker.endswith("@redis:6379/0")  # the broker needs its password
    assert "--requirepass" in str(services["redis"]["command"])
    assert "redis" in (services["airflow-scheduler"].get("depends_on") or {})
    gpu_worker, worker = services["airflow-worker-gpu"], services["airflow-worker"]
    assert flag(args(gpu_worker), "--queues") == env(gpu_worker)["FTOPS_TRAIN_QUEUE"] == "gpu" and gpus(gpu_worker)
    assert flag(args(worker), "--queues") == "default" and not gpus(worker)
    for name in ("airflow-scheduler", "airflow-apiserver", "airflow-dag-processor", "airflow-triggerer"):
        assert not gpus(services[name]), f"{name} reserves a GPU"
    # Tasks take S3 credentials from an Airflow connection.
    for w in (worker, gpu_worker):
        conn = env(w)["FTOPS_AWS_CONN_ID"]
        assert json.loads(env(w)[f"AIRFLOW_CONN_{conn.upper()}"])["conn_type"] == "aws"


def test_vllm_reads_every_adapter_the_platform_asks_it_to_load(services):
    """Production adapters (the reconciler) and evaluation candidates (ftops.model.tasks.evaluate, under
    FTOPS_VLLM_ADAPTER_DIR/.eval) are both written below FTOPS_VLLM_ADAPTER_DIR by the workers: that folder must
    be the same volume at the same path in the workers and in every vLLM replica."""
    adapter_dir = env(services["airflow-worker"])["FTOPS_VLLM_ADAPTER_DIR"]

    def mount(service: dict) -> str | None:
        for v in service.get("volumes", []):
            src, dst = v.split(":")[:2] if isinstance(v, str) else (v.get("source"), v.get("target"))
            if dst == adapter_dir:
                return src
        return None

    source = mount(services["airflow-worker"])
    assert source and not source.startswith((".", "/"))  # a named volume, shared
    for name in ["airflow-worker-gpu", *vllm_replicas(services)]:
        assert mount(services[name]) == source, name
