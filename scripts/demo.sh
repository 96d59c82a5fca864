#!/usr/bin/env bash
# The whole platform on embedded defaults (SQLite, local disk, CPU): for every demo customer, a new upload
# lands in its inbox, its `finetune_<customer>` DAG runs (ingest → ... → promote), then
# `sync_vllm_adapters` loads every production adapter into vLLM, and the report shows each customer's
# production version, gate metrics and vLLM's answer through its adapter next to the base model's.
# Services stay up afterwards for the UIs; `make stop` stops them.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export FTOPS_HOME=${FTOPS_HOME:-$ROOT/.ftops}
LOGS="$FTOPS_HOME/logs"
mkdir -p "$LOGS"
started=$SECONDS

scripts/services.sh start all
scripts/services.sh start api  # the customer API (files, fine-tuning jobs, a page at /) on ${API_PORT:-8090}
CUSTOMERS=$(.venv/bin/python -c 'from ftops.config import load_platform; print(" ".join(load_platform().customers))')
STORAGE=$(.venv/bin/python -c 'from ftops.config import settings; print(settings().storage_root)')

for c in $CUSTOMERS; do
  inbox="$STORAGE/$c/inbox"
  n=$( (ls "$inbox" 2>/dev/null || true) | wc -l)
  .venv/bin/ftops data generate "$c" "$inbox" --batch "$n" --n 80 >/dev/null
  echo "== finetune_$c (upload batch $n; log: $LOGS/finetune_$c.log)"
  t0=$SECONDS
  if scripts/airflow.sh dags test "finetune_$c" >"$LOGS/finetune_$c.log" 2>&1; then
    echo "   finished in $((SECONDS - t0)) s: $(grep -o 'state=[a-z_]*, run_type' "$LOGS/finetune_$c.log" | tail -1 | cut -d, -f1)"
  else
    # A candidate the gate refused is the platform working, not the demo breaking: say which rule and why.
    gate=$(grep -o "failed the gate on [a-z_, ]*\. What to do: [^{]*" "$LOGS/finetune_$c.log" | head -1 || true)
    if [ -n "$gate" ]; then
      echo "   the gate refused the candidate after $((SECONDS - t0)) s (production unchanged): ${gate}"
      echo "   every answer it gave: the gate report (MLflow, the training run's gate/gate_report.html); log: $LOGS/finetune_$c.log"
    else
      echo "   FAILED after $((SECONDS - t0)) s; see $LOGS/finetune_$c.log" >&2
    fi
  fi
done

echo "== sync_vllm_adapters (log: $LOGS/sync_vllm_adapters.log)"
scripts/airflow.sh dags test sync_vllm_adapters >"$LOGS/sync_vllm_adapters.log" 2>&1 \
  || { echo "sync failed; see $LOGS/sync_vllm_adapters.log" >&2; exit 1; }

.venv/bin/ftops serving status
.venv/bin/ftops report  # through vLLM with the serving admin key ($FTOPS_HOME/secrets/serving_admin_key)
echo
VLLM="http://127.0.0.1:${VLLM_PORT:-8000}"
echo "== calling vLLM as a customer: every request needs that customer's key (shown once; only its hash is kept)"
for c in $CUSTOMERS; do
  echo "   $c:"
  echo "     KEY=\$(.venv/bin/ftops keys create $c)"
  echo "     curl -s $VLLM/v1/chat/completions -H \"Authorization: Bearer \$KEY\" -H 'Content-Type: application/json' \\"
  echo "       -d '{\"model\": \"$c\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 40}'"
  echo "     .venv/bin/python -c \"import openai, os; print(openai.OpenAI(base_url='$VLLM/v1', api_key=os.environ['KEY'])\\"
  echo "       .chat.completions.create(model='$c', messages=[{'role': 'user', 'content': 'Hello'}]).choices[0].message.content)\""
done
echo "   (export KEY for the python line; a key reaches only its own customer's model; revoke: ftops keys revoke KEY_ID)"
echo
API="${FTOPS_API_URL:-http://127.0.0.1:${API_PORT:-8090}}"
echo "== the customer API at $API (FTOPS_API_URL): upload data, see its validation at once, follow fine-tuning jobs"
echo "   (a key for it needs the files and jobs scopes; the page at $API/ does the same without code; jobs need the scheduler: make airflow-ui)"
for c in $CUSTOMERS; do
  echo "   $c:"
  echo "     export KEY=\$(.venv/bin/ftops keys create $c --scope files --scope jobs)"
  echo "     .venv/bin/python - <<'PY'"
  echo "import openai, os"
  echo "c = openai.OpenAI(base_url='$API/v1', api_key=os.environ['KEY'])"
  echo "f = c.files.create(file=open('my-data.jsonl', 'rb'), purpose='fine-tune')"
  echo "print(f.id, f.status, f.validation)  # read, kept, dropped per reason, PII per type, errors with line numbers"
  echo "job = c.fine_tuning.jobs.create(training_file=f.id, model='$(.venv/bin/python -c "from ftops.config import load_platform; print(load_platform().customers['$c'].base_model)")')"
  echo "print(c.fine_tuning.jobs.retrieve(job.id).status, [e.message for e in c.fine_tuning.jobs.list_events(job.id)])"
  echo "PY"
done
echo
echo "demo done in $((SECONDS - started)) s. MLflow UI: http://127.0.0.1:${MLFLOW_PORT:-5000}  ·  Airflow UI: make airflow-ui  ·  stop: make stop"
# The operator's view (plugins/ftops_fleet.py): every customer's production, served state, runs and data.
echo "Adapter fleet page: http://127.0.0.1:${AIRFLOW_PORT:-8080}/plugin/ftops-fleet  (after: make airflow-ui; JSON: /ftops/api/customers)"
