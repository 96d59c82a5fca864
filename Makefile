# ftops: `make demo` sets everything up and runs the whole platform; `make test` runs the tests.
.PHONY: setup demo test lint stop airflow-ui bench clean

setup:
	scripts/setup.sh

demo: setup
	scripts/demo.sh

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q -ra

lint:
	.venv/bin/ruff check .

airflow-ui:
	scripts/services.sh start airflow

stop:
	scripts/services.sh stop-all

clean: stop
	rm -rf .ftops
