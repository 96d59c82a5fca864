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
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, timeout=timeout)

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

    def chat(self, model: str, prompt: str, max_tokens: int = 48) -> str:
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


@dataclass
class Desired:
    customer: str
    registry_version: str
    adapter_version: str
    adapter_prefix: str


@dataclass
class Report:
    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def local_path(adapter_dir: Path, d: Desired) -> Path:
    return adapter_dir / d.customer / d.adapter_version


def reconcile(desired: list[Desired], replica_urls: list[str], adapter_dir: Path, store) -> Report:
    """Load missing, swap changed, unload removed adapters on every replica; a down replica is reported."""
    report = Report()
    for d in desired:
        store.download_dir(d.adapter_prefix, local_path(adapter_dir, d))
    for url in replica_urls:
        replica = Replica(url)
        try:
            loaded = replica.adapters()
        except httpx.HTTPError as exc:
            report.errors.append(f"{url}: unreachable ({exc})")
            continue
        for d in desired:
            path = str(local_path(adapter_dir, d))
            if loaded.get(d.customer) == path:
                continue
            try:
                replica.load(d.customer, path, inplace=d.customer in loaded)
                report.actions.append(
                    f"{url}: {'swapped' if d.customer in loaded else 'loaded'} {d.customer} "
                    f"-> registry v{d.registry_version} ({d.adapter_version})"
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
