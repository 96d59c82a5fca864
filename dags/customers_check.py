"""Customers file check: an Airflow import error naming every invalid entry of `include/customers.yaml`.

`customer_finetune.py` builds a DAG for every valid customer and sets the invalid ones aside, so one bad
entry cannot remove every customer's DAG. This file defines no DAG: it fails to import while any entry is
invalid, so the UI's *DAG Import Errors* names the customer and the field to fix.
"""

from __future__ import annotations

from ftops.config import load_platform

load_platform().check()
