"""Serving: keep vLLM replicas in step with the registry (the `sync_vllm_adapters` DAG calls `reconcile`).

Desired state: every customer's `production` alias, each version's values checked before use (registry
tags are input). Actual state: `GET /v1/models` on each replica (a LoRA entry's `root` is its adapter
path, `parent` the base model). Adapters are copied from object storage to the replicas' adapter folder at
an immutable version path (atomically, so a partial copy is never loaded), their sha256 checked against
the registry's, then loaded under the model name `<customer>` with vLLM's runtime LoRA API (`load_inplace`
swaps a changed version without a gap).

Fail safe: a customer whose state is unknown (its entry invalid, its version refused, its copy failed) is
left exactly as served; only an explicit removal (gone from the customers file, or its production alias
deleted while the registry answers) unloads. Names that are not customer ids (evaluation's temporary
`eval.<customer>.<run>.<model>` adapters) are never touched. Every error is reported; the caller fails.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger(__name__)


class ServingError(RuntimeError):
    pass


class Replica:
    def __init__(self, url: str, timeout: float = 60):
        from ftops.release.keys import auth_headers

        self.url = url.rstrip("/")
        # The serving admin key: the replicas' middleware admits load/unload and every model only with it.
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=auth_headers())

    def models(self) -> list[dict]:
        r = self.http.get("/v1/models")
        r.raise_for_status()
        return r.json()["data"]

    def base_model(self) -> str:
        return next(m["id"] for m in self.models() if not m.get("parent"))

    def adapters(self) -> dict[str, str]:
        """Loaded LoRA adapters: model name -> adapter path."""
        return {m["id"]: m["root"] for m in self.models() if m.get("parent")}

    def load(self, name: str, path: str, inplace: bool) -> None:
        r = self.http.post(
            "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path, "load_inplace": inplace}
        )
        if r.status_code != 200:
            raise ServingError(f"{self.url}: loading {name} from {path} failed: {r.status_code} {r.text[:300]}")

    def unload(self, name: str) -> None:
        r = self.http.post("/v1/unload_lora_adapter", json={"lora_name": name})
        if r.status_code != 200:
            raise ServingError(f"{self.url}: unloading {name} failed: {r.status_code} {r.text[:300]}")

    def chat(self, model: str, prompt: str, max_tokens: int = 64, system: str | None = None) -> str:
        r = self.http.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": messages(prompt, system),
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )
        if r.status_code != 200:
            raise ServingError(f"{self.url}: completion for {model} failed: {r.status_code} {r.text[:300]}")
        return r.json()["choices"][0]["message"]["content"].strip()


def replica_adapters(urls, timeout: float = 3.0) -> dict[str, dict[str, str] | None]:
    """Per replica, the LoRA adapters it serves (name -> adapter path), or None when it does not answer."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(url: str) -> dict[str, str] | None:
        try:
            return Replica(url, timeout).adapters()
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None

    urls = list(urls)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(urls)))) as pool:
        return dict(zip(urls, pool.map(ask, urls), strict=True))


def served_state(customer: str, want: str | None, replicas: dict[str, dict[str, str] | None]) -> dict:
    """The one rule of what a customer's serving state is, for the fleet page and `ftops serving status`. Per
    replica: `in sync` (serves `want`, production's adapter version), `drift` (serves another version, or
    nothing while production exists, or something while none does), `down` (no answer); `-` when neither side
    has one. Overall: the worst replica's."""
    per = {}
    for url, adapters in replicas.items():
        if adapters is None:
            per[url] = {"state": "down", "serves": None}
            continue
        root = adapters.get(customer)
        serves = Path(root).name if root else None
        # Adapters live at <adapter dir>/<customer>/<adapter version> (`local_path`).
        matches = bool(root) and Path(root).name == want and Path(root).parent.name == customer
        if not want:
            state = "drift" if root else "-"
        else:
            state = "in sync" if matches else "drift"
        per[url] = {"state": state, "serves": serves}
    states = {p["state"] for p in per.values()}
    overall = next((s for s in ("down", "drift", "in sync") if s in states), "-")
    return {"state": overall, "replicas": per}


def engine_for(urls: list[str] | tuple[str, ...], base_model: Path) -> Replica | None:
    """The first reachable replica serving this base model (so an evaluation runs on the serving engine)."""
    for url in urls:
        replica = Replica(url, timeout=120)
        try:
            if any(not m.get("parent") and m["root"] == str(base_model) for m in replica.models()):
                return replica
        except httpx.HTTPError:
            continue
    return None


def eval_name(customer: str, run_key: str, model: str) -> str:
    """Evaluation's temporary adapter name: dots keep it from ever being a customer id (which the reconciler
    manages), so a sync running during an evaluation leaves it alone."""
    return f"eval.{customer}.{run_key}.{model}"


def messages(prompt: str, system: str | None = None) -> list[dict]:
    """One user turn, after the customer's system message when it has one (`system_prompt`)."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def answers_from(
    replica: Replica, name: str, adapter_dir: Path | None, prompts: list[str], system: str | None = None
) -> list[str]:
    """Greedy answers from a replica, through `adapter_dir` loaded under a temporary name (unloaded after).
    Sent concurrently: vLLM batches them, several times faster than one by one."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(model: str) -> list[str]:
        # The first answer alone: it is the probe a swap is checked against, and batching can change the
        # last bits of the arithmetic, hence a greedy token.
        first = [replica.chat(model, prompts[0], system=system)] if prompts else []
        with ThreadPoolExecutor(max_workers=8) as pool:
            return first + list(pool.map(lambda p: replica.chat(model, p, system=system), prompts[1:]))

    if adapter_dir is None:
        return ask(replica.base_model())
    replica.load(name, str(adapter_dir), inplace=True)
    try:
        if replica.adapters().get(name) != str(adapter_dir):
            raise ServingError(f"{replica.url}: {name} is not served from {adapter_dir}")
        return ask(name)
    finally:
        # Cleanup must never replace the evaluation's own error; a leftover temporary name is harmless
        # (the reconciler ignores names that are not customer ids), so a failed unload is only logged.
        try:
            replica.unload(name)
        except (ServingError, httpx.HTTPError) as exc:
            log.warning("could not unload the temporary adapter %s: %s", name, exc)


@dataclass
class Desired:
    customer: str
    registry_version: str
    adapter_version: str
    adapter_prefix: str
    sha256: str  # of adapter_model.safetensors, recorded at registration: checked before vLLM loads it
    tree_sha256: str = ""  # of every file of the folder (config included), when registration recorded it
    rank: int = 0
    probe_prompt: str = ""  # greedy answer the gate recorded through vLLM: a swap must reproduce it
    probe_answer: str = ""


@dataclass
class Plan:
    """What the registry and the customers file say, customer by customer."""

    serve: list[Desired] = field(default_factory=list)
    remove: set[str] = field(default_factory=set)  # production alias deleted while the registry answered
    keep: dict[str, str] = field(default_factory=dict)  # customer -> why it is left as it is (unknown)
    unregistered: set[str] = field(default_factory=set)  # the registry answered: no model for this customer
    customers: set[str] = field(default_factory=set)  # every valid customer of the customers file
    removal_blocked: str = ""  # why a loaded name missing from the customers file must not be unloaded


@dataclass
class Report:
    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class ReconcileIncomplete(ServingError):
    """Some of the reconcile could not be done; what could be done was, and nothing was removed for it."""


WEIGHTS = "adapter_model.safetensors"


def local_path(adapter_dir: Path, d: Desired) -> Path:
    """The version's folder under `<adapter_dir>/<customer>/`; a name that would leave it is refused."""
    home = (adapter_dir / d.customer).resolve()
    path = (home / d.adapter_version).resolve()
    if path.parent != home:
        raise ServingError(f"{d.customer}: adapter version {d.adapter_version!r} leaves {home}")
    return path


def tree_sha256(files: dict[str, bytes]) -> str:
    """One digest of a whole adapter folder (relative name and content of every file): the config that
    tells vLLM how to apply the weights (scaling, target modules) is covered too, not just the weights."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{hashlib.sha256(files[name]).hexdigest()}\n".encode())
    return digest.hexdigest()


def verified_copy(store, prefix: str, dest: Path, sha256: str, label: str, tree: str = "") -> Path:
    """A complete local copy of an adapter whose weights hash to `sha256` and, when the registry recorded
    one, whose whole folder hashes to `tree` (both recorded at registration)."""
    path = store.download_dir(prefix, dest)
    weights = path / WEIGHTS
    if not weights.is_file() or weights.is_symlink():
        raise ServingError(f"{label}: {path} has no {WEIGHTS}")
    if hashlib.sha256(weights.read_bytes()).hexdigest() != sha256:
        raise ServingError(f"{label}: refused: {WEIGHTS} does not match the sha256 recorded at registration")
    if any(p.is_symlink() for p in path.rglob("*")):
        raise ServingError(f"{label}: refused: {path} holds a symbolic link")
    files = {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    if tree and tree_sha256(files) != tree:
        raise ServingError(
            f"{label}: refused: the adapter's files do not match the tree sha256 recorded at registration"
        )
    return path


def capacity(ranks: dict[str, int]) -> dict[str, int]:
    """vLLM's LoRA limits for these customers: every adapter kept loaded, rank up to the largest one."""
    supported = [8, 16, 32, 64, 128, 256, 320, 512]  # vLLM accepts these values of --max-lora-rank
    largest = max(ranks.values(), default=8)
    return {
        "max_lora_rank": next((r for r in supported if r >= largest), supported[-1]),
        "max_cpu_loras": len(ranks) + 2,  # every production adapter, plus the gate's evaluation slots
        "max_loras": min(max(len(ranks), 1), 8),  # adapters mixed in one batch: bounded by GPU memory
    }


def point_resolver(resolver_dir: Path, ready: list[Desired], adapter_dir: Path, removed: set[str]) -> None:
    """`<resolver_dir>/<customer>` -> the production version's folder, swapped atomically, so a replica that
    restarted serves the right version on its first request (vLLM's filesystem LoRA resolver). Links of
    customers neither ready nor removed are left as they are."""
    resolver_dir.mkdir(parents=True, exist_ok=True)
    for d in ready:
        link, tmp = resolver_dir / d.customer, resolver_dir / f".{d.customer}.new"
        target = local_path(adapter_dir, d)
        if link.is_symlink() and link.resolve() == target:
            continue
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        tmp.replace(link)
    for name in removed:
        link = resolver_dir / name
        if link.is_symlink():
            link.unlink()


def _probe_differs(replica: Replica, d: Desired) -> bool:
    """Does the replica answer the gate's probe unlike the version it should serve (a stale cache)?
    Reported, not fatal: under load, batching can move a greedy token."""
    return bool(d.probe_prompt and d.probe_answer) and (
        replica.chat(d.customer, d.probe_prompt)[:40] != d.probe_answer[:40]
    )


def _removable(name: str, plan: Plan) -> tuple[bool, str]:
    """Should a loaded adapter name be unloaded? (yes/no, and an error when the answer is unknown)."""
    from ftops.config import CUSTOMER_ID_RE

    if not CUSTOMER_ID_RE.fullmatch(name) or name in plan.keep:
        return False, ""  # not a customer's name (an evaluation's), or a customer whose state is unknown
    if name in plan.remove:
        return True, ""
    if name in plan.unregistered:
        return False, (
            f"{name} is served but the registry has no model for it; not unloaded (registry data lost, or its "
            "model not renamed by `ftops adapters migrate-names`)"
        )
    if name in plan.customers:
        return False, ""
    if plan.removal_blocked:
        return False, f"{name} is served but not in the customers file; not unloaded: {plan.removal_blocked}"
    return True, ""


def reconcile(plan: Plan, replica_urls: list[str], adapter_dir: Path, store, max_rank: int | None = None) -> Report:
    """Load missing, swap changed, unload removed adapters on every replica. What fails (a replica down,
    storage unreachable mid-copy, a load refused, a hash mismatch) is reported and left as it was."""
    report = Report()
    report.errors += [f"{c}: left as served: {why}" for c, why in plan.keep.items()]
    replicas: dict[str, tuple[Replica, dict[str, str]]] = {}
    for url in replica_urls:
        replica = Replica(url)
        try:
            replicas[url] = (replica, replica.adapters())
        except httpx.HTTPError as exc:
            report.errors.append(f"{url}: unreachable ({exc})")
    resolver = adapter_dir / "resolver"
    ready = []
    for d in plan.serve:
        if max_rank is not None and d.rank > max_rank:
            report.errors.append(f"{d.customer}: LoRA rank {d.rank} exceeds the replicas' --max-lora-rank {max_rank}")
            continue
        try:
            path = str(local_path(adapter_dir, d))
            link = resolver / d.customer
            needed = any(loaded.get(d.customer) != path for _, loaded in replicas.values())
            if needed or not (link.is_symlink() and str(link.resolve()) == path):
                label = f"{d.customer} v{d.registry_version}"
                verified_copy(store, d.adapter_prefix, Path(path), d.sha256, label, d.tree_sha256)
            ready.append(d)
        except Exception as exc:  # storage down, a refused hash, ...: this customer stays as served
            report.errors.append(f"{d.customer}: registry v{d.registry_version} not served: {exc}")
    refused: set[str] = set()  # customers a replica would not load: their resolver link keeps what it served
    for url, (replica, loaded) in replicas.items():
        for d in ready:
            path = str(local_path(adapter_dir, d))
            if loaded.get(d.customer) == path:
                continue
            try:
                replica.load(d.customer, path, inplace=d.customer in loaded)
                if replica.adapters().get(d.customer) != path:
                    refused.add(d.customer)
                    report.errors.append(f"{url}: {d.customer} does not report {path} after loading")
                    continue
                if _probe_differs(replica, d):
                    report.actions.append(
                        f"{url}: warning: {d.customer} answers the probe unlike v{d.registry_version}"
                    )
                verb = "swapped" if d.customer in loaded else "loaded"
                report.actions.append(
                    f"{url}: {verb} {d.customer} -> registry v{d.registry_version} ({d.adapter_version})"
                )
            except (ServingError, httpx.HTTPError) as exc:
                refused.add(d.customer)
                report.errors.append(f"{url}: {d.customer}: {exc}")
        for name in loaded:
            remove, why = _removable(name, plan)
            if why:
                report.errors.append(f"{url}: {why}")
            if not remove:
                continue
            try:
                replica.unload(name)
                report.actions.append(f"{url}: unloaded {name}")
            except (ServingError, httpx.HTTPError) as exc:
                report.errors.append(f"{url}: {name}: {exc}")
    # After the loads: a version a replica refused must not be what a restarted replica resolves to.
    point_resolver(resolver, [d for d in ready if d.customer not in refused], adapter_dir, plan.remove)
    return report
