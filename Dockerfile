# The Airflow image of docker-compose.yaml (every airflow-* service and the Celery workers): Airflow 3.3.2 on
# Python 3.11, the platform's pinned dependencies (requirements.txt) and the ftops package. Built, never
# installed at start-up. The DAGs and customers file are mounted by the stack (./dags, ./include), so a new
# customer needs no rebuild; a code change in include/ftops does.
#   docker compose build      (or: docker build -t ftops/airflow:latest .)
FROM apache/airflow:3.3.2-python3.11

# requirements.txt pins the CPU build of torch (the development machines have no GPU); the image takes the
# CUDA build of the same version from PyPI, for the `gpu` workers. Airflow itself is pinned to the base image's.
COPY --chown=airflow:0 requirements.txt /tmp/requirements.txt
RUN sed -e 's/^torch==\([0-9.]*\)+cpu$/torch==\1/' /tmp/requirements.txt > /tmp/requirements-image.txt \
 && pip install --no-cache-dir "apache-airflow==3.3.2" -r /tmp/requirements-image.txt

COPY --chown=airflow:0 pyproject.toml README.md /opt/ftops/
COPY --chown=airflow:0 include/ftops /opt/ftops/include/ftops
RUN pip install --no-cache-dir --no-deps /opt/ftops
