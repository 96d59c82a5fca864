#!/usr/bin/env bash
# Run the `airflow` CLI against this project's DAGs with an embedded home (SQLite) under FTOPS_HOME,
# migrating the metadata database on first use. Examples:
#   scripts/airflow.sh dags test finetune_brightdesk
#   scripts/airflow.sh standalone            # the UI on http://127.0.0.1:8080
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export FTOPS_HOME=${FTOPS_HOME:-$ROOT/.ftops}
export AIRFLOW_HOME=${AIRFLOW_HOME:-$FTOPS_HOME/airflow}
export AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags
export AIRFLOW__CORE__PLUGINS_FOLDER=$ROOT/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION=False
export AIRFLOW__API__PORT=${AIRFLOW_PORT:-8080}
export AIRFLOW__API__HOST=${AIRFLOW__API__HOST:-127.0.0.1}
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://127.0.0.1:$AIRFLOW__API__PORT/execution/}
# Local single-user default: the UI and REST API without a login (loopback only). Production sets an auth
# manager (see docker-compose.yaml).
export AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS=${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS:-True}
export PATH="$ROOT/.venv/bin:$PATH"
# SQLite waits up to 30 s for a lock instead of failing a request (standalone runs several writers).
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-sqlite:///$AIRFLOW_HOME/airflow.db?timeout=30}
mkdir -p "$AIRFLOW_HOME"
if [[ ! -f "$AIRFLOW_HOME/.migrated" ]]; then
  airflow db migrate >"$AIRFLOW_HOME/migrate.log" 2>&1 || { tail -n 30 "$AIRFLOW_HOME/migrate.log" >&2; exit 1; }
  touch "$AIRFLOW_HOME/.migrated"
fi
if [[ $AIRFLOW__DATABASE__SQL_ALCHEMY_CONN == "sqlite:///$AIRFLOW_HOME/airflow.db"* ]]; then
  # Write-ahead log: readers stop waiting on the writer. Standalone runs the scheduler, dag-processor,
  # triggerer and API server on this one file; with the default journal the API stalled for 30 s.
  python -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).execute('PRAGMA journal_mode=WAL')" \
    "$AIRFLOW_HOME/airflow.db"
fi
if [[ ! -f "$AIRFLOW_HOME/.pools" ]]; then
  # Trainings take slots of the `gpu` pool: it caps how many run at once (one per GPU in production).
  airflow pools set gpu "${FTOPS_TRAIN_SLOTS:-1}" "concurrent trainings" >>"$AIRFLOW_HOME/migrate.log" 2>&1
  touch "$AIRFLOW_HOME/.pools"
fi
exec airflow "$@"
