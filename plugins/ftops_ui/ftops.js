// ftops fleet pages. Plain JS, no CDN (the platform runs offline). Every URL is built from this page's own
// location, so the pages work under any Airflow base_url and inside the UI's iframe.
const ftops = (() => {
  const BASE = location.pathname.replace(/ftops\/.*$/, "ftops/"); // ".../ftops/"
  const ROOT = BASE.slice(0, -"ftops/".length); // Airflow's base path, e.g. "/"
  const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const ago = (iso) => {
    if (!iso) return "";
    const s = (Date.parse(iso) - Date.now()) / 1000, a = Math.abs(s);
    const t = a < 90 ? `${Math.round(a)} s` : a < 5400 ? `${Math.round(a / 60)} min` : a < 129600 ? `${Math.round(a / 3600)} h` : `${Math.round(a / 86400)} d`;
    return s < 0 ? `${t} ago` : `in ${t}`;
  };
  const when = (iso) => (iso ? `<span title="${esc(iso)}">${esc(ago(iso))}</span>` : "");
  const stateClass = (s) => ({ "in sync": "ok", success: "ok", passed: "ok", drift: "warn", running: "warn", queued: "warn", down: "bad", failed: "bad" })[s] || "na";
  const badge = (s, title) => `<span class="badge ${stateClass(s)}" title="${esc(title || "")}">${esc(s)}</span>`;

  async function api(path, opts) {
    const r = await fetch(BASE + path, { credentials: "same-origin", ...opts });
    const body = r.headers.get("content-type")?.includes("json") ? await r.json() : await r.text();
    if (!r.ok) throw new Error(`${r.status}: ${typeof body === "string" ? body : body.detail ? JSON.stringify(body.detail) : JSON.stringify(body)}`);
    return body;
  }
  const showError = (e) => { document.getElementById("error").textContent = e ? String(e.message || e) : ""; };

  // --- fleet page ---------------------------------------------------------------------------------------
  const sortValue = {
    customer: (r) => r.customer,
    production: (r) => (r.production ? Number(r.production.version) : -1),
    served: (r) => ["down", "drift", "-", "in sync"].indexOf(r.served.state),
    last_run: (r) => r.last_run?.start || "",
    next_run: (r) => r.next_run || "~",
    inbox: (r) => r.inbox ?? -1,
    quarantine_share: (r) => r.quarantine_share ?? -1,
    traffic: (r) => r.traffic?.requests ?? -1,
  };

  // A customer whose newest versions all failed the gate: production stays old while every run fails.
  const stuckMark = (st) => (st
    ? `<br><span class="badge bad stuck" title="${esc(st.advice)}">${esc(st.label)}</span><br><span class="small bad">${esc(st.failures)} failed gates in a row (since v${esc(st.since)}): ${esc(st.advice)}</span>`
    : "");

  function fleetRow(r) {
    const p = r.production;
    const prod = p
      ? `<b>v${esc(p.version)}</b> <span class="muted small">${esc(p.adapter_version)}</span><br><span class="small muted">${when(p.promoted_at)} · ${esc(p.promoted_by)}</span>`
      : `<span class="na">none</span>`;
    const served = badge(r.served.state) + `<br><span class="small muted">` +
      Object.entries(r.served.replicas).map(([u, x]) => `${esc(u.replace(/^https?:\/\//, ""))}: ${esc(x.state)}${x.serves ? ` (${esc(x.serves)})` : ""}`).join("<br>") + "</span>";
    const lr = r.last_run;
    const last = (lr
      ? `${badge(lr.state)} ${lr.gate ? badge(lr.gate, "gate") : ""}<br><span class="small muted">${when(lr.start)} · ${esc(lr.run_type)}</span>`
      : `<span class="na">never</span>`) + stuckMark(r.stuck);
    const t = r.traffic;
    const traffic = t ? `${t.requests} req · ${t.errors} err<br><span class="small muted">p95 ${t.p95_ms ?? "n/a"} ms</span>` : `<span class="na">n/a</span>`;
    const q = r.quarantine_share == null ? `<span class="na">-</span>` : `${(100 * r.quarantine_share).toFixed(1)} %`;
    return `<tr data-customer="${esc(r.customer)}">
      <td><a href="customers/${encodeURIComponent(r.customer)}"><b>${esc(r.customer)}</b></a><br><span class="small muted">${esc(r.name)} · ${esc(r.base_model)}</span></td>
      <td>${prod}</td><td>${served}</td><td>${last}</td>
      <td>${r.paused ? '<span class="warn">paused</span>' : when(r.next_run) || '<span class="na">-</span>'}</td>
      <td>${r.inbox ?? '<span class="na">?</span>'}</td><td>${q}</td><td>${traffic}</td></tr>`;
  }

  async function fleetPage() {
    let rows = [], sortKey = "customer", dir = 1;
    const tbody = document.querySelector("#fleet tbody");
    const render = () => {
      const f = document.getElementById("filter").value.trim().toLowerCase();
      const sf = document.getElementById("served-filter").value;
      const shown = rows.filter((r) => (!f || `${r.customer} ${r.name} ${r.base_model}`.toLowerCase().includes(f)) && (!sf || r.served.state === sf));
      const key = sortValue[sortKey];
      shown.sort((a, b) => (key(a) < key(b) ? -dir : key(a) > key(b) ? dir : 0));
      tbody.innerHTML = shown.map(fleetRow).join("");
      document.querySelectorAll("#fleet th").forEach((th) => { th.className = th.dataset.key === sortKey ? (dir > 0 ? "sorted-asc" : "sorted-desc") : ""; });
      const counts = rows.reduce((c, r) => ((c[r.served.state] = (c[r.served.state] || 0) + 1), c), {});
      const stuck = rows.filter((r) => r.stuck).length;
      document.getElementById("summary").textContent = `${rows.length} customers (${shown.length} shown) · served: ` +
        Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ") + (stuck ? ` · ${stuck} stuck` : "");
    };
    const load = async () => {
      const t0 = performance.now();
      try {
        const data = await api("api/customers");
        rows = data.customers;
        showError(null);
        render();
        document.getElementById("timing").textContent = `loaded and drawn in ${((performance.now() - t0) / 1000).toFixed(2)} s`;
        document.body.dataset.loaded = "true";
      } catch (e) { showError(e); }
    };
    document.querySelectorAll("#fleet th").forEach((th) => th.addEventListener("click", () => {
      dir = sortKey === th.dataset.key ? -dir : 1; sortKey = th.dataset.key; render();
    }));
    document.getElementById("filter").addEventListener("input", render);
    document.getElementById("served-filter").addEventListener("change", render);
    document.getElementById("reload").addEventListener("click", load);
    await load();
  }

  // --- customer page ------------------------------------------------------------------------------------
  function chart(title, versions, key, fmt, colorOf) {
    // One small line chart: x = registry version, y = the metric; green dots passed the gate, red did not.
    const pts = versions.filter((v) => v.metrics[key] != null).slice().reverse();
    const W = 300, H = 150, L = 44, R = 10, T = 22, B = 26;
    let svg = `<svg class="chart" role="img" aria-label="${esc(title)}" data-metric="${key}" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">
      <text x="${L}" y="14" font-size="12" fill="currentColor">${esc(title)}</text>`;
    if (!pts.length) return svg + `<text x="${L}" y="${H / 2}" font-size="12" fill="gray">no data</text></svg>`;
    let lo = Math.min(...pts.map((v) => v.metrics[key])), hi = Math.max(...pts.map((v) => v.metrics[key]));
    if (hi === lo) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
    const x = (i) => L + (pts.length === 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (pts.length - 1));
    const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
    svg += `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="gray"/><line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="gray"/>
      <text x="${L - 4}" y="${T + 4}" font-size="10" text-anchor="end" fill="gray">${fmt(hi)}</text>
      <text x="${L - 4}" y="${H - B}" font-size="10" text-anchor="end" fill="gray">${fmt(lo)}</text>`;
    svg += `<polyline fill="none" stroke="#2b6cb0" stroke-width="1.5" points="${pts.map((v, i) => `${x(i)},${y(v.metrics[key])}`).join(" ")}"/>`;
    pts.forEach((v, i) => {
      const prod = v.aliases.includes("production");
      svg += `<circle class="point" cx="${x(i)}" cy="${y(v.metrics[key])}" r="${prod ? 6 : 4}" fill="${colorOf(v)}" stroke="${prod ? "currentColor" : "none"}" stroke-width="2">
        <title>v${esc(v.version)} (${esc(v.gate)}${prod ? ", production" : ""}): ${fmt(v.metrics[key])}</title></circle>
        <text x="${x(i)}" y="${H - B + 14}" font-size="10" text-anchor="middle" fill="gray">v${esc(v.version)}</text>`;
    });
    return svg + "</svg>";
  }

  function retentionChart(ret, gateOf) {
    // Retention across versions: x = registry version, one line per group of earlier data (its held-out loss
    // as each version's evaluation measured it); a rising line is forgetting; a version the gate refused is
    // ringed red. Inline SVG, nothing from a CDN.
    const W = 460, H = 190, L = 44, R = 10, T = 22, B = 26, colors = ["#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#2c7a7b", "#975a16", "#4a5568"];
    const title = "Retention: held-out loss on earlier data (lower is better)";
    let svg = `<svg class="chart" role="img" aria-label="${esc(title)}" data-metric="retention" width="${W}" height="${H + 16 * ret.series.length}" viewBox="0 0 ${W} ${H + 16 * ret.series.length}">
      <text x="${L}" y="14" font-size="12" fill="currentColor">${esc(title)}</text>`;
    const vals = ret.series.flatMap((s) => s.points.map((p) => p.loss)).filter((v) => v != null);
    if (!vals.length) return svg + `<text x="${L}" y="${H / 2}" font-size="12" fill="gray">no earlier data compared yet</text></svg>`;
    let lo = Math.min(0, ...vals), hi = Math.max(...vals);
    if (hi === lo) hi = lo + 1;
    const n = ret.versions.length, xi = (ver) => ret.versions.indexOf(ver);
    const x = (i) => L + (n === 1 ? (W - L - R) / 2 : (i * (W - L - R)) / (n - 1));
    const y = (v) => T + (H - T - B) * (1 - (v - lo) / (hi - lo));
    const f3 = (v) => (v == null ? "-" : Number(v).toFixed(3));
    svg += `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="gray"/><line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="gray"/>
      <text x="${L - 4}" y="${T + 4}" font-size="10" text-anchor="end" fill="gray">${f3(hi)}</text>
      <text x="${L - 4}" y="${H - B}" font-size="10" text-anchor="end" fill="gray">${f3(lo)}</text>`;
    ret.versions.forEach((ver, i) => { svg += `<text x="${x(i)}" y="${H - B + 14}" font-size="10" text-anchor="middle" fill="gray">v${esc(ver)}</text>`; });
    ret.series.forEach((s, k) => {
      const c = colors[k % colors.length], pts = s.points.filter((p) => p.loss != null);
      svg += `<polyline class="series" fill="none" stroke="${c}" stroke-width="1.5" points="${pts.map((p) => `${x(xi(p.version))},${y(p.loss)}`).join(" ")}"/>`;
      pts.forEach((p) => {
        svg += `<circle class="point" cx="${x(xi(p.version))}" cy="${y(p.loss)}" r="3.5" fill="${c}"${gateOf(p.version) === "failed" ? ' stroke="#c53030" stroke-width="2"' : ""}><title>v${esc(p.version)} (${esc(gateOf(p.version))}) on ${esc(s.label)}: ${f3(p.loss)} (production then ${f3(p.production)}, ${p.increase == null ? "-" : (p.increase >= 0 ? "+" : "") + Number(p.increase).toFixed(3)})</title></circle>`;
      });
      svg += `<rect x="${L}" y="${H + 16 * k - 2}" width="10" height="10" fill="${c}"/><text x="${L + 14}" y="${H + 16 * k + 7}" font-size="11" fill="currentColor">${esc(s.label)}</text>`;
    });
    return svg + "</svg>";
  }

  function confirmThen(text, action) {
    const d = document.getElementById("confirm");
    document.getElementById("confirm-text").textContent = text;
    const yes = document.getElementById("confirm-yes"), no = document.getElementById("confirm-no");
    yes.onclick = async () => { d.close(); await action(); };
    no.onclick = () => d.close();
    d.showModal();
  }

  async function customerPage() {
    const customer = decodeURIComponent(location.pathname.split("/customers/")[1].replace(/\/$/, ""));
    const move = async (action, version) => {
      try {
        const r = await api(`api/customers/${encodeURIComponent(customer)}/${action}`, {
          method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ version, confirm: true }),
        });
        await load();
        document.getElementById("subtitle").insertAdjacentHTML("beforeend",
          ` · <b class="ok" id="moved">${esc(action)}: production is now v${esc(r.production)}</b>${r.sync_triggered ? " (serving sync started)" : ""}`);
        loadAnswers();
      } catch (e) { showError(e); }
    };
    const load = async () => {
      let d;
      try { d = await api(`api/customers/${encodeURIComponent(customer)}`); showError(null); } catch (e) { showError(e); return; }
      document.title = `${d.customer} · ftops`;
      document.getElementById("title").textContent = `${d.name} (${d.customer})`;
      const airflowDag = `${ROOT}dags/${encodeURIComponent(d.dag_id)}`;
      document.getElementById("subtitle").innerHTML = `model <code>${esc(d.model)}</code> on ${esc(d.base_model)} · production <b id="production">${d.production ? "v" + esc(d.production) : "none"}</b>` +
        `${d.previous ? ` · previous v${esc(d.previous)}` : ""} · <a target="_top" href="${airflowDag}">${esc(d.dag_id)}</a>`;
      const acts = document.getElementById("actions");
      acts.innerHTML = d.can_act && d.previous ? `<button class="danger" id="rollback">Roll back to v${esc(d.previous)}</button>` : d.can_act ? "" : `<span class="muted small">You may read this customer; promoting needs the right to trigger ${esc(d.dag_id)}.</span>`;
      document.getElementById("rollback")?.addEventListener("click", () =>
        confirmThen(`Roll ${d.customer} back from v${d.production} to v${d.previous}? vLLM will serve v${d.previous} after the sync.`, () => move("rollback", null)));
      const gateColor = (v) => (v.gate === "passed" ? "#1f8a4c" : v.gate === "failed" ? "#c53030" : "gray");
      const f2 = (n) => (n == null ? "" : Number(n).toFixed(3)), f1 = (n) => (n == null ? "" : Number(n).toFixed(1)), pc = (n) => (n == null ? "" : `${Math.round(100 * n)}%`);
      document.getElementById("charts").innerHTML =
        chart("Validation loss (lower is better)", d.versions, "val_loss", f2, gateColor) +
        chart("Golden set chrF", d.versions, "golden_chrf", f1, gateColor) +
        chart("Checks pass rate", d.versions, "checks_pass_rate", pc, gateColor) +
        chart("Repeated 3-grams in answers", d.versions, "repetition", pc, gateColor) +
        retentionChart(d.retention, (ver) => d.versions.find((v) => v.version === ver)?.gate || "");
      document.getElementById("stuck").innerHTML = d.stuck
        ? `<span class="badge bad stuck">${esc(d.stuck.label)}</span> ${esc(d.stuck.failures)} failed gates in a row (since v${esc(d.stuck.since)}): ${esc(d.stuck.advice)}. Start a run: <a target="_top" href="${airflowDag}">${esc(d.dag_id)}</a> → Trigger (form field <code>strategy</code>).`
        : "";
      document.querySelector("#versions tbody").innerHTML = d.versions.map((v) => {
        const l = v.links, ds = v.dataset;
        const links = [
          l.mlflow_run && `<a target="_blank" href="${esc(l.mlflow_run)}">MLflow run</a>`,
          `<a target="_blank" href="${esc(l.mlflow_model_version)}">model version</a>`,
          l.airflow_run && `<a target="_top" href="${ROOT}${esc(l.airflow_run)}">Airflow run</a>`,
          l.gate_report && `<a target="_blank" href="${BASE}${esc(l.gate_report)}">gate report</a>`,
        ].filter(Boolean).join(" · ");
        const lineage = ds.version ? `<code>${esc(ds.version)}</code><br><span class="small muted">new: ${esc(ds.new_versions.join(", ") || "-")}${ds.replay_examples ? ` · replay ${esc(ds.replay_examples)}` : ""}</span>` : `<span class="na">-</span>`;
        const by = v.promoted ? `<br><span class="small muted">${esc(v.promoted.action)} by ${esc(v.promoted.by)} ${when(v.promoted.at)}</span>` : "";
        const btn = d.can_act && v.can_promote ? `<button class="primary promote" data-version="${esc(v.version)}">Promote</button>` : "";
        return `<tr data-version="${esc(v.version)}"><td><b>v${esc(v.version)}</b> ${v.aliases.map((a) => `<span class="badge ${a === "production" ? "ok" : "na"}">${esc(a)}</span>`).join(" ")}<br><span class="small muted">${esc(v.adapter_version)}</span>${by}</td>
          <td>${when(v.registered_at)}</td><td>${badge(v.gate, v.gate_reasons)}${v.gate === "failed" && v.gate_reasons ? `<br><span class="small bad reasons">${esc(v.gate_reasons.slice(0, 160))}</span>` : ""}</td>
          <td>${f2(v.metrics.val_loss)}${v.metrics.base_val_loss == null ? "" : `<br><span class="small muted">base ${f2(v.metrics.base_val_loss)}</span>`}</td><td>${f1(v.metrics.golden_chrf)}</td><td>${pc(v.metrics.checks_pass_rate)}</td>
          <td>${v.forgetting.max == null ? '<span class="na">-</span>' : `${v.forgetting.max >= 0 ? "+" : ""}${Number(v.forgetting.max).toFixed(3)}`}${v.forgetting.groups.length ? `<br><span class="small muted">worst of ${v.forgetting.groups.length} group${v.forgetting.groups.length === 1 ? "" : "s"} of earlier data</span>` : ""}</td>
          <td>${lineage}</td><td class="small">${links}</td><td>${btn}</td></tr>`;
      }).join("");
      document.querySelectorAll("button.promote").forEach((b) => b.addEventListener("click", () =>
        confirmThen(`Promote ${d.customer} v${b.dataset.version} to production (now ${d.production ? "v" + d.production : "none"})?`, () => move("promote", b.dataset.version))));
      document.body.dataset.loaded = "true";
    };
    const loadAnswers = async () => {
      const el = document.getElementById("answers");
      try {
        const a = await api(`api/customers/${encodeURIComponent(customer)}/answers`);
        el.className = "";
        el.innerHTML = `<p class="small muted">Prompt: <b>${esc(a.prompt)}</b> · replica ${esc(a.replica || "none answered")}</p>
          <div class="answers"><div><b>${esc(customer)}</b> (served adapter <code>${esc((a.adapter || "").split("/").slice(-1)[0] || "none")}</code>)<pre id="served-answer">${esc(a.served ?? "not served")}</pre></div>
          <div><b>base model</b><pre id="base-answer">${esc(a.base ?? "")}</pre></div></div>${(a.errors || []).map((e) => `<div class="bad small">${esc(e)}</div>`).join("")}`;
      } catch (e) { el.textContent = String(e.message || e); }
    };
    await load();
    loadAnswers();
  }

  return { fleetPage, customerPage };
})();
