"""The train task's pod under Kubernetes, checked offline: the DAG's train task (parsed as the scheduler parses
it, with the Kubernetes executor configured) carries a pod_override; the cncf.kubernetes provider's pod generator
merges it into a worker pod template exactly as KubernetesExecutor does, and `kubernetes-validate` checks the
result against the Kubernetes API schema (strict: unknown fields are errors)."""

from __future__ import annotations

import datetime
import importlib.util
import sys
from pathlib import Path

import kubernetes_validate
import pytest

from conftest import ROOT, TEST_CUSTOMERS

TEMPLATE = "airflow/providers/cncf/kubernetes/pod_template_file_examples/dags_in_image_template.yaml"


def load_dag_module(monkeypatch, **env):
    monkeypatch.setenv("FTOPS_CUSTOMERS", str(TEST_CUSTOMERS))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    spec = importlib.util.spec_from_file_location("k8s_dag_under_test", ROOT / "dags" / "customer_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def render(task) -> dict:
    from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator
    from kubernetes.client import ApiClient

    base = PodGenerator.deserialize_model_file(
        next(Path(p) / TEMPLATE for p in sys.path if (Path(p) / TEMPLATE).is_file())
    )
    pod = PodGenerator.construct_pod(
        dag_id=task.dag_id,
        task_id=task.task_id,
        pod_id="finetune-brightdesk-train",
        try_number=1,
        kube_image="ftops-airflow:latest",
        date=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        args=["airflow", "tasks", "run", task.dag_id, task.task_id, "manual__1"],
        pod_override_object=task.executor_config["pod_override"],
        base_worker_pod=base,
        namespace="ftops",
        scheduler_job_id="1",
        run_id="manual__1",
    )
    return ApiClient().sanitize_for_serialization(pod)


@pytest.mark.parametrize(
    "env",
    [
        {"AIRFLOW__CORE__EXECUTOR": "KubernetesExecutor"},
        # Multiple executors: only train runs on Kubernetes.
        {"AIRFLOW__CORE__EXECUTOR": "CeleryExecutor,KubernetesExecutor", "FTOPS_TRAIN_EXECUTOR": "KubernetesExecutor"},
    ],
)
def test_train_pod_asks_for_a_gpu_and_is_a_valid_pod(monkeypatch, env):
    dag = load_dag_module(monkeypatch, **env).finetune_brightdesk
    train = dag.get_task("train")
    pod = render(train)
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    (container,) = pod["spec"]["containers"]
    assert container["name"] == "base" and container["image"] == "ftops-airflow:latest"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["spec"]["tolerations"])
    # The template's own settings survive the merge (the override only adds the GPU).
    assert any(e["name"] == "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" for e in container["env"])
    # Only the train task asks for a GPU.
    assert all(not t.executor_config for t in dag.tasks if t.task_id != "train")
    if "FTOPS_TRAIN_EXECUTOR" in env:
        assert train.executor == "KubernetesExecutor" and dag.get_task("evaluate").executor is None


def test_no_pod_override_off_kubernetes(monkeypatch):
    monkeypatch.delenv("FTOPS_TRAIN_EXECUTOR", raising=False)
    dag = load_dag_module(monkeypatch, AIRFLOW__CORE__EXECUTOR="CeleryExecutor").finetune_brightdesk
    assert dag.get_task("train").executor_config == {} and dag.get_task("train").queue == "gpu"


def test_a_broken_override_fails_validation():
    """The validator is not a rubber stamp: a pod asking for a GPU count that is not a quantity is refused."""
    from kubernetes.client import ApiClient

    from ftops.executors import train_pod_override

    pod = ApiClient().sanitize_for_serialization(train_pod_override(1))
    pod |= {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}}
    pod["spec"]["containers"][0]["image"] = "x"
    kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
    pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = ["one"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
