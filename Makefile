# ftops: `make demo` sets everything up and runs the whole platform; `make test` runs the tests.
.PHONY: setup demo test lint lock stop airflow-ui bench clean

setup:
	scripts/setup.sh

demo: setup
	scripts/demo.sh

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q -ra --durations=25

lint:
	.venv/bin/ruff check .

lock:  # requirements.in -> requirements.txt, keeping every pin that still fits
	.venv/bin/uv pip compile requirements.in -o requirements.txt --python-version 3.11 --no-header

airflow-ui:
	scripts/services.sh start airflow

stop:
	scripts/services.sh stop-all

clean: stop
	rm -rf .ftops
