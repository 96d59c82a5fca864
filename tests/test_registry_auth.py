"""The registry with MLflow's basic-auth app on (as docker-compose.yaml runs it), a real server started by
scripts/services.sh: the platform's service user registers and moves aliases; an operator's read-only login
sees everything and changes nothing; no login gets nothing. A registry that refuses the platform is an error,
never an empty answer (the reconciler would unload every adapter on "no production version")."""

from __future__ import annotations

import secrets

import httpx
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client

from conftest import _service
from ftops.operate.identities import mlflow_auth_ini
from ftops.release.registry import PRODUCTION, Registry, RegistryError, model_name

pytestmark = pytest.mark.e2e
CUSTOMER, BASE = "acme", "tiny"


@pytest.fixture(scope="module")
def mlflow_auth(home, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    password = secrets.token_urlsafe(24)
    config = tmp / "basic_auth.ini"
    config.write_text(mlflow_auth_ini(password, f"sqlite:///{tmp / 'basic_auth.db'}"))
    extra = {"MLFLOW_AUTH_CONFIG": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(24)}
    for svc in _service("mlflow", extra | {"FTOPS_HOME": str(tmp)}, "MLFLOW_PORT"):
        yield svc.url, password


def login(monkeypatch, user: str | None, password: str | None = None) -> None:
    for var, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)


def test_only_the_service_user_moves_aliases(mlflow_auth, monkeypatch):
    url, service_password = mlflow_auth
    login(monkeypatch, "ftops", service_password)
    run = MlflowClient(url).create_run("0").info.run_id
    reg = Registry(url)
    v1 = reg.register(CUSTOMER, BASE, "s3://ftops/acme/adapters/tiny/v1", run, {"gate.decision": "passed"})
    v2 = reg.register(
        CUSTOMER, BASE, "s3://ftops/acme/adapters/tiny/v2", MlflowClient(url).create_run("0").info.run_id, {}
    )
    reg.promote(CUSTOMER, BASE, v1.version)
    operator_password = secrets.token_urlsafe(16)
    get_app_client("basic-auth", tracking_uri=url).create_user("operator", operator_password)

    login(monkeypatch, "operator", operator_password)
    ro = Registry(url)
    assert ro.by_alias(CUSTOMER, BASE, PRODUCTION).version == v1.version  # operators read everything
    assert [v.version for v in ro.versions(CUSTOMER, BASE)] == [v1.version, v2.version]
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
        ro.promote(CUSTOMER, BASE, v2.version, force=True)
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
        ro.set_tags(CUSTOMER, BASE, v2.version, {"gate.decision": "passed"})
    with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
        ro.client.delete_registered_model_alias(model_name(CUSTOMER, BASE), PRODUCTION)

    login(monkeypatch, "ftops", service_password)
    assert Registry(url).by_alias(CUSTOMER, BASE, PRODUCTION).version == v1.version  # nothing moved
    assert "gate.decision" not in Registry(url).get(CUSTOMER, BASE, v2.version).tags


def test_no_or_wrong_login_is_an_error_not_an_empty_registry(mlflow_auth, monkeypatch):
    url, _ = mlflow_auth
    assert httpx.get(f"{url}/api/2.0/mlflow/registered-models/search").status_code == 401
    for user, password in ((None, None), ("ftops", "wrong")):
        login(monkeypatch, user, password)
        with pytest.raises((MlflowException, RegistryError)):
            Registry(url).by_alias(CUSTOMER, BASE, PRODUCTION)
