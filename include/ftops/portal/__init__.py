"""The customer's door: an OpenAI-compatible files and fine-tuning jobs API (`ftops api`, port 8090).

`app` wires the routes; `auth` checks keys and scopes; `upload` streams a multipart upload to disk; `files`
validates an upload with the ingest chain's own code and keeps the customer's files; `jobs` maps the customer's
Airflow runs to fine-tuning jobs; `page` is the plain HTML page a person uses without writing code.
"""
