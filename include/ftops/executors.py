"""Where the train task runs beyond one machine: its Celery queue, and under Kubernetes its pod.

- Celery: trainings go to the `gpu` queue (FTOPS_TRAIN_QUEUE), served only by GPU workers; every other task
  goes to Airflow's default queue. LocalExecutor ignores queue names, so the demo is unaffected.
- Kubernetes: `executor_config["pod_override"]` asks for FTOPS_TRAIN_GPUS (1) `nvidia.com/gpu` on the task
  container (KubernetesExecutor merges overrides by container name: `base`). Built only when the train task
  runs on Kubernetes: AIRFLOW__CORE__EXECUTOR says so, or FTOPS_TRAIN_EXECUTOR names the executor for train
  alone (Airflow's multiple executors, e.g. `CeleryExecutor,KubernetesExecutor` with train on the second).
  Other executors ignore executor_config; skipping it keeps the kubernetes client out of DAG parsing.
"""

from __future__ import annotations

import os


def train_queue() -> str:
    return os.environ.get("FTOPS_TRAIN_QUEUE", "gpu")


def train_executor() -> str | None:
    """The executor named for the train task alone (None: the default executor)."""
    return os.environ.get("FTOPS_TRAIN_EXECUTOR") or None


def on_kubernetes() -> bool:
    named = train_executor() or os.environ.get("AIRFLOW__CORE__EXECUTOR", "").split(",")[0]
    return "KubernetesExecutor" in named


def train_pod_override(gpus: int | None = None):
    """The train pod's override: GPUs as a limit (Kubernetes requires extended resources' request == limit,
    and sets the request from the limit), and a toleration for the usual GPU-node taint."""
    from kubernetes.client import models as k8s

    gpus = gpus if gpus is not None else int(os.environ.get("FTOPS_TRAIN_GPUS", "1"))
    if gpus < 1:
        raise ValueError(f"FTOPS_TRAIN_GPUS must be at least 1, got {gpus}")
    return k8s.V1Pod(
        spec=k8s.V1PodSpec(
            containers=[
                k8s.V1Container(name="base", resources=k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": str(gpus)}))
            ],
            tolerations=[k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        )
    )


def train_executor_config() -> dict:
    return {"pod_override": train_pod_override()} if on_kubernetes() else {}
