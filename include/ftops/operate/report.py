"""The gate report: candidate vs production vs base per metric, the decision and every reason, as one
self-contained HTML page (chart embedded) logged to MLflow next to the candidate's training run."""

from __future__ import annotations

import base64
import html
import io

METRICS = [
    ("val_loss", "held-out loss (lower is better)"),
    ("golden_chrf", "golden chrF (higher is better)"),
    ("checks_pass_rate", "golden checks passed"),
    ("pii_answers", "answers with PII"),
    ("cross_tenant_leaks", "answers naming another customer"),
    ("canary_leaks", "canaries generated"),
]
MODELS = ("base", "production", "candidate")


def chart(metrics: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [
        (k, label) for k, label in METRICS if any(isinstance(metrics.get(m, {}).get(k), int | float) for m in MODELS)
    ]
    fig, axes = plt.subplots(1, len(shown), figsize=(3 * len(shown), 3))
    for ax, (key, label) in zip(axes if len(shown) > 1 else [axes], shown, strict=True):
        names = [m for m in MODELS if m in metrics]
        values = [metrics[m].get(key) or 0 for m in names]
        ax.bar(names, values, color=["#999999", "#4c78a8", "#f58518"][: len(names)])
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def render(customer: str, version: str, metrics: dict, decision: dict) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(label)}</td>" + "".join(f"<td>{_fmt(metrics.get(m, {}).get(k))}</td>" for m in MODELS) + "</tr>"
        for k, label in METRICS
    )
    reasons = "".join(f"<li>{e(r)}</li>" for r in decision["reasons"] + decision.get("warnings", []))
    samples = "".join(
        f"<h3>{m}</h3><p><b>Q:</b> {e(metrics[m]['sample']['prompt'])}<br>"
        f"<b>A:</b> {e(metrics[m]['sample']['answer'])}</p>"
        for m in MODELS
        if m in metrics and metrics[m].get("sample")
    )
    findings = "".join(
        f"<li>{e(p)}: {e('; '.join(f))}</li>"
        for p, f in metrics.get("candidate", {}).get("safety_findings", {}).items()
    )
    png = base64.b64encode(chart(metrics)).decode()
    verdict = "PASSED" if decision["passed"] else "FAILED"
    return (
        f"<html><head><meta charset='utf-8'><title>Gate {e(customer)} v{e(version)}</title></head><body>"
        f"<h1>{e(customer)}: candidate version {e(version)} {verdict} the gate</h1>"
        f"<p>Engine that produced the answers: {e(str(metrics.get('engine', '')))}; held-out examples: "
        f"{metrics.get('val_examples')}</p><img src='data:image/png;base64,{png}'>"
        f"<table border=1 cellpadding=4><tr><th>metric</th>{''.join(f'<th>{m}</th>' for m in MODELS)}</tr>"
        f"{rows}</table>"
        f"<h2>Decision</h2><ul>{reasons}</ul><h2>Safety findings (candidate)</h2><ul>{findings or '<li>none</li>'}</ul>"
        f"<h2>Sample answers</h2>{samples}</body></html>"
    )


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.4f}" if isinstance(v, float) else str(v)
