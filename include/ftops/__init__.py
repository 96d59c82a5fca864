"""ftops: fine-tuning operations for one LoRA adapter per customer on a shared base model.

Every stage (ingest, validate, clean, dedupe, snapshot, train, evaluate, gate, registry, serving) is a
plain module here, importable and testable without Airflow; `ftops.cli` exposes them to operators and
`dags/` only wires them. Keep this file free of heavy imports: DAG files import `ftops.config`.
"""

__version__ = "0.1.0"
