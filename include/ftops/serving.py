"""Serving: keep vLLM replicas in step with the registry (the `sync_vllm_adapters` DAG calls `reconcile`).

Desired state: every customer's `production` alias. Actual state: `GET /v1/models` on each replica
(a LoRA entry's `root` is its adapter path, `parent` the base model). Adapters are copied from object
storage to the replicas' adapter folder at an immutable version path (atomically, so a partial copy is
never loaded), then loaded under the model name `<customer>` with vLLM's runtime LoRA API
(`load_inplace` swaps a changed version without a gap). Adapters no longer in production are unloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import httpx


class ServingError(RuntimeError):
    pass


class Replica:
    def __init__(self, url: str, timeout: float = 60):
        from ftops.keys import auth_headers

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

    def chat(self, model: str, prompt: str, max_tokens: int = 64) -> str:
        r = self.http.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
                "temperature": 0,
            },
        )
        if r.status_code != 200:
            raise ServingError(f"{self.url}: completion for {model} failed: {r.status_code} {r.text[:300]}")
        return r.json()["choices"][0]["message"]["content"].strip()


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


def answers_from(replica: Replica, name: str, adapter_dir: Path | None, prompts: list[str]) -> list[str]:
    """Greedy answers from a replica, through `adapter_dir` loaded under a temporary name (unloaded after).
    Sent concurrently: vLLM batches them, several times faster than one by one."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(model: str) -> list[str]:
        # The first answer alone: it is the probe a swap is checked against, and batching can change the
        # last bits of the arithmetic, hence a greedy token.
        first = [replica.chat(model, prompts[0])] if prompts else []
        with ThreadPoolExecutor(max_workers=8) as pool:
            return first + list(pool.map(lambda p: replica.chat(model, p), prompts[1:]))

    if adapter_dir is None:
        return ask(replica.base_model())
    replica.load(name, str(adapter_dir), inplace=True)
    try:
        if replica.adapters().get(name) != str(adapter_dir):
            raise ServingError(f"{replica.url}: {name} is not served from {adapter_dir}")
        return ask(name)
    finally:
        replica.unload(name)


@dataclass
class Desired:
    customer: str
    registry_version: str
    adapter_version: str
    adapter_prefix: str
    rank: int = 0
    probe_prompt: str = ""  # greedy answer the gate recorded through vLLM: a swap must reproduce it
    probe_answer: str = ""


@dataclass
class Report:
    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def local_path(adapter_dir: Path, d: Desired) -> Path:
    return adapter_dir / d.customer / d.adapter_version


def capacity(ranks: dict[str, int]) -> dict[str, int]:
    """vLLM's LoRA limits for these customers: every adapter kept loaded, rank up to the largest one."""
    supported = [8, 16, 32, 64, 128, 256, 320, 512]  # vLLM accepts these values of --max-lora-rank
    largest = max(ranks.values(), default=8)
    return {
        "max_lora_rank": next((r for r in supported if r >= largest), supported[-1]),
        "max_cpu_loras": len(ranks) + 2,  # every production adapter, plus the gate's evaluation slots
        "max_loras": min(max(len(ranks), 1), 8),  # adapters mixed in one batch: bounded by GPU memory
    }


def point_resolver(resolver_dir: Path, desired: list[Desired], adapter_dir: Path) -> None:
    """`<resolver_dir>/<customer>` -> the production version's folder, swapped atomically, so a replica that
    restarted serves the right version on its first request (vLLM's filesystem LoRA resolver)."""
    resolver_dir.mkdir(parents=True, exist_ok=True)
    wanted = {d.customer for d in desired}
    for d in desired:
        link, tmp = resolver_dir / d.customer, resolver_dir / f".{d.customer}.new"
        target = local_path(adapter_dir, d)
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        tmp.replace(link)
    for link in resolver_dir.iterdir():
        if link.is_symlink() and link.name not in wanted and not link.name.startswith("."):
            link.unlink()


def _probe_differs(replica: Replica, d: Desired) -> bool:
    """Does the replica answer the gate's probe unlike the version it should serve (a stale cache)?
    Reported, not fatal: under load, batching can move a greedy token."""
    return bool(d.probe_prompt and d.probe_answer) and (
        replica.chat(d.customer, d.probe_prompt)[:40] != d.probe_answer[:40]
    )


def reconcile(
    desired: list[Desired], replica_urls: list[str], adapter_dir: Path, store, max_rank: int | None = None
) -> Report:
    """Load missing, swap changed, unload removed adapters on every replica; a down replica is reported."""
    report = Report()
    ready = []
    for d in desired:
        if max_rank is not None and d.rank > max_rank:
            report.errors.append(f"{d.customer}: LoRA rank {d.rank} exceeds the replicas' --max-lora-rank {max_rank}")
            continue
        store.download_dir(d.adapter_prefix, local_path(adapter_dir, d))
        ready.append(d)
    point_resolver(adapter_dir / "resolver", ready, adapter_dir)
    for url in replica_urls:
        replica = Replica(url)
        try:
            loaded = replica.adapters()
        except httpx.HTTPError as exc:
            report.errors.append(f"{url}: unreachable ({exc})")
            continue
        for d in ready:
            path = str(local_path(adapter_dir, d))
            if loaded.get(d.customer) == path:
                continue
            try:
                replica.load(d.customer, path, inplace=d.customer in loaded)
                if replica.adapters().get(d.customer) != path:
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
                report.errors.append(str(exc))
        wanted = {d.customer for d in desired}
        for name in loaded:
            if name not in wanted:
                try:
                    replica.unload(name)
                    report.actions.append(f"{url}: unloaded {name}")
                except (ServingError, httpx.HTTPError) as exc:
                    report.errors.append(str(exc))
    return report
