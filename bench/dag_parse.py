"""Benchmark DAG parsing as the customer count grows: 50, 500, 1000 tenants by default.

For each N a customers file of N tenants goes to a temp dir (FTOPS_CUSTOMERS points at it). Then, in fresh
subprocesses per file and method (best of --repeat): the parse time of each file in `dags/` as Airflow does it,
`DagBag(dag_folder=<file>)`, and the bare module exec (`runpy.run_path`). `import airflow.sdk` (and the DagBag
class) is imported before the clock starts and reported once as `shared_import_s`, so each figure is the file's
own cost. Next, one full pass of Airflow's real DAG processor (`airflow dag-processor --num-runs 1`, a temp
AIRFLOW_HOME on SQLite, migrated outside the timing): it parses, serialises and writes every DAG to the DB.
Baseline, same run: the same DAG factory with `import mlflow, transformers` at its top (what DESIGN.md warns
against), at every size. `marginal_s_per_dag` (seconds per extra DAG between sizes) stays flat if parsing grows
linearly.

    .venv/bin/python bench/dag_parse.py --customers 50 500 1000 [--against REF]

`--against REF` adds a before/after at the largest size: the whole `dags/` folder of this checkout and of a
worktree of REF (its own `include/` first on PYTHONPATH), each parsed by `DagBag` in a fresh process, rounds
interleaved (`--repeat` each); `before_after.ours_over_before` is the ratio of the medians.

Progress goes to stderr; the last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from earlier import checkout  # bench/ is on sys.path: this file runs as a script

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
BIN = ROOT / ".venv" / "bin"
PROCESSOR_CMD = ["airflow", "dag-processor", "--num-runs", "1"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def customers_yaml(n: int) -> str:
    head = "base_models:\n  tiny: {path: tiny-llama, description: bench}\ndefaults: {base_model: tiny}\ncustomers:\n"
    return head + "".join(
        f"  - {{id: tenant-{i:04d}, name: Tenant {i}, description: Tenant {i}., schedule_weekday: {i % 7}}}\n"
        for i in range(1, n + 1)
    )


def worker(method: str, path: str) -> None:
    """In a fresh process: time one file, parsed by `DagBag` or exec'd by `runpy`; print one JSON line."""
    t0 = time.perf_counter()
    import airflow.sdk  # noqa: F401
    from airflow.dag_processing.dagbag import DagBag

    shared = time.perf_counter() - t0
    t0 = time.perf_counter()
    if method == "dagbag":
        bag = DagBag(dag_folder=path)
        out = {"dags": len(bag.dags), "errors": {k: str(v) for k, v in bag.import_errors.items()}}
    else:
        runpy.run_path(path, run_name="bench_dag_file")
        out = {}
    print(json.dumps({"s": time.perf_counter() - t0, "shared_import_s": shared, **out}))


def in_fresh_process(method: str, path: Path, env: dict) -> dict:
    """`worker(method, path)` in a new Python process with `env`; its JSON line."""
    cmd = [sys.executable, __file__, "--worker", method, str(path)]
    return json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def parse_files(files: list[Path], env: dict, shared: list[float], repeat: int) -> dict:
    """Per file: DagBag seconds (and DAGs found) and bare-exec seconds, the best of `repeat` fresh processes each."""
    res = {}
    for f in files:
        runs = {m: [] for m in ("dagbag", "exec")}
        for m in [*runs] * repeat:
            runs[m].append(in_fresh_process(m, f, env))
        bag = runs["dagbag"][0]
        assert not bag["errors"], f"{f.name}: import errors {bag['errors']}"
        res[f.name] = {f"{m}_s": round(min(r["s"] for r in rs), 3) for m, rs in runs.items()} | {"dags": bag["dags"]}
        shared += [r["shared_import_s"] for rs in runs.values() for r in rs]
    return res


def processor_pass(env: dict) -> dict:
    """One full pass of the real DAG processor (parse, serialise, write to the DB); the migration is untimed."""
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, capture_output=True)
    t0 = time.perf_counter()
    proc = subprocess.run(PROCESSOR_CMD, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    db = sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db")
    dags, errors = (db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("serialized_dag", "import_error"))
    db.close()
    assert errors == 0, f"{errors} import errors in the DAG processor's pass"
    return {"wall_s": round(seconds, 3), "dags": dags}


def against(ref: str, n: int, env: dict, repeat: int) -> dict:
    """The whole dags/ folder of this checkout and of REF's worktree, DagBag-parsed in fresh processes, interleaved."""
    seconds: dict[str, list[float]] = {"ours": [], "before": []}
    with checkout(ref) as (tree, before_env):
        folders = {"ours": (DAGS, env), "before": (tree / "dags", {**env, "PYTHONPATH": before_env["PYTHONPATH"]})}
        for r in range(repeat):
            for who in ("ours", "before") if r % 2 == 0 else ("before", "ours"):
                folder, e = folders[who]
                out = in_fresh_process("dagbag", folder, e)
                assert not out["errors"], f"{who}: import errors {out['errors']}"
                seconds[who].append(out["s"])
                log(f"before/after round {r} {who}: {out['s']:.3f} s for {out['dags']} DAGs")
    med = {who: statistics.median(s) for who, s in seconds.items()}
    return {
        "ref": ref,
        "customers": n,
        **{f"{who}_median_s": round(m, 3) for who, m in med.items()},
        **{f"{who}_each_s": [round(x, 3) for x in s] for who, s in seconds.items()},
        "ours_over_before": round(med["ours"] / med["before"], 3),
    }


def env_for(tmp: str, n: int, base_env: dict) -> dict:
    """A customers file of n tenants and an empty AIRFLOW_HOME, both under tmp."""
    home, customers = Path(tmp, f"home-{n}"), Path(tmp, f"customers-{n}.yaml")
    home.mkdir(exist_ok=True)
    customers.write_text(customers_yaml(n))
    return {**base_env, "FTOPS_CUSTOMERS": str(customers), "AIRFLOW_HOME": str(home)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, nargs="+", default=[50, 500, 1000])
    ap.add_argument("--repeat", type=int, default=3, help="parse runs per file and method; the best counts")
    ap.add_argument("--against", metavar="REF", help="before/after against an earlier commit's dags/ and include/")
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker)
    files, sizes, shared = sorted(DAGS.glob("*.py")), {}, []
    base_env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS)}
    base_env["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    with tempfile.TemporaryDirectory(prefix="dag-parse-") as tmp:
        for n in sorted(args.customers):
            env = env_for(tmp, n, base_env)
            log(f"N={n}: parsing {len(files)} files (DagBag and runpy, best of {args.repeat} fresh processes each)")
            per_file = parse_files(files, env, shared, args.repeat)
            dags, total = (sum(f[k] for f in per_file.values()) for k in ("dags", "dagbag_s"))
            assert dags == n + 1, f"N={n}: DagBag found {dags} DAGs, expected {n + 1}"
            log(f"N={n}: DagBag total {total:.2f} s for {dags} DAGs; one dag-processor pass")
            proc = processor_pass(env)
            assert proc["dags"] == n + 1, f"N={n}: the processor serialised {proc['dags']} DAGs"
            log(f"N={n}: dag-processor pass {proc['wall_s']:.2f} s")
            sizes[n] = {"dags": dags, "files": per_file, "total_dagbag_s": round(total, 3), "processor": proc}
            sizes[n]["total_exec_s"] = round(sum(f["exec_s"] for f in per_file.values()), 3)
            sizes[n]["s_per_dag"] = round(total / dags, 5)
            sizes[n]["processor_s_per_dag"] = round(proc["wall_s"] / dags, 5)
        # Baseline at every size: the same factory with `import mlflow, transformers` at its top (what a DAG
        # file that imports its task code at module level costs).
        src, head = (DAGS / "customer_finetune.py").read_text(), "from __future__ import annotations\n"
        assert head in src
        naive = Path(tmp, "naive-dags", "customer_finetune_naive.py")
        naive.parent.mkdir()
        naive.write_text(src.replace(head, head + "\nimport mlflow  # noqa: F401\nimport transformers  # noqa\n", 1))
        baseline = {}
        for n in sorted(args.customers):
            log(f"baseline N={n}: the same factory with heavy imports at its top")
            ours, bad = parse_files(
                [DAGS / "customer_finetune.py", naive], env_for(tmp, n, base_env), [], args.repeat
            ).values()
            assert ours["dags"] == bad["dags"] == n, (ours, bad)
            baseline[str(n)] = {
                **{f"{who}_{k}": r[k] for who, r in (("naive", bad), ("ours", ours)) for k in ("dagbag_s", "exec_s")},
                "naive_over_ours": round(bad["dagbag_s"] / ours["dagbag_s"], 2),
            }
        before_after = (
            against(args.against, max(args.customers), env_for(tmp, max(args.customers), base_env), args.repeat)
            if args.against
            else None
        )
    ns = sorted(sizes)
    marginal = {  # seconds per extra DAG between consecutive sizes: flat if parsing grows linearly
        f"{a}-{b}": round((sizes[b]["total_dagbag_s"] - sizes[a]["total_dagbag_s"]) / (b - a), 5)
        for a, b in zip(ns, ns[1:], strict=False)
    }
    result = {
        "bench": "dag_parse",
        "cores": os.cpu_count(),
        "shared_import_s": round(sum(shared) / len(shared), 3),
        "repeat": args.repeat,
        "processor_method": " ".join(PROCESSOR_CMD),
        "sizes": {str(n): v for n, v in sizes.items()},
        "s_per_dag": {str(n): v["s_per_dag"] for n, v in sizes.items()},
        "linearity_ratio": round(sizes[ns[-1]]["s_per_dag"] / sizes[ns[0]]["s_per_dag"], 3),
        "marginal_s_per_dag": marginal,
        "processor_linearity_ratio": round(
            sizes[ns[-1]]["processor_s_per_dag"] / sizes[ns[0]]["processor_s_per_dag"], 3
        ),
        f"target_{ns[-1]}_under_3s": sizes[ns[-1]]["total_dagbag_s"] < 3.0,
        "baseline": baseline,
    }
    if before_after:
        result["before_after"] = before_after
    print(json.dumps(result))


if __name__ == "__main__":
    main()
