"""The page a person uses without writing code: paste a key, upload a file, read its validation report, follow
jobs. Plain HTML and a little JavaScript calling the same API (no CDN, nothing loaded from elsewhere); the key
stays in the page's memory only. Every value from the API is put in the page as text, never as markup."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ftops: your fine-tuning</title>
<meta http-equiv="Content-Security-Policy"
 content="default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<style>
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.3rem;text-align:left}
.error{color:#a00}.ok{color:#070}pre{background:#f4f4f4;padding:.5rem;overflow:auto}
</style></head><body>
<h1>Your fine-tuning</h1>
<p><label>API key <input id="key" type="password" size="60" autocomplete="off"></label>
<button id="load">Show my files and jobs</button> <span id="who"></span></p>
<h2>Upload training data</h2>
<form id="upload"><input id="file" type="file" accept=".jsonl,.json,.ndjson,.gz">
<button type="submit">Upload and validate</button></form>
<div id="result"></div>
<h2>Files</h2><table id="files"><thead><tr><th>id</th><th>name</th><th>status</th><th>read</th><th>kept</th>
<th>dropped</th><th>PII</th></tr></thead><tbody></tbody></table>
<h2>Jobs</h2><table id="jobs"><thead><tr><th>id</th><th>status</th><th>model</th><th>error</th></tr></thead>
<tbody></tbody></table>
<script>
const $ = (id) => document.getElementById(id);
const auth = () => ({Authorization: "Bearer " + $("key").value.trim()});
function cell(row, text, cls) { const td = row.insertCell(); td.textContent = text ?? ""; if (cls) td.className = cls; }
function counts(o) { return Object.entries(o || {}).map(([k, v]) => k + ": " + v).join(", "); }
async function call(path, opts) {
  const r = await fetch(path, Object.assign({headers: auth()}, opts || {}));
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && body.error.message) || ("HTTP " + r.status));
  return body;
}
function report(f) {
  const box = $("result"); box.textContent = "";
  const h = document.createElement("h3"); h.id = "report-status";
  h.textContent = f.id + ": " + f.status + (f.status_details ? " (" + f.status_details + ")" : "");
  h.className = f.status === "processed" ? "ok" : "error"; box.appendChild(h);
  const pre = document.createElement("pre"); pre.id = "report"; pre.textContent = JSON.stringify(f.validation, null, 2);
  box.appendChild(pre);
}
async function refresh() {
  $("who").textContent = "";
  try {
    const files = await call("/v1/files");
    const tb = $("files").tBodies[0]; tb.textContent = "";
    for (const f of files.data) {
      const row = tb.insertRow(); const v = f.validation || {};
      cell(row, f.id); cell(row, f.filename); cell(row, f.status, f.status === "processed" ? "ok" : "error");
      cell(row, v.read); cell(row, v.kept); cell(row, counts(v.dropped)); cell(row, counts(v.pii));
    }
  } catch (e) { $("who").textContent = "files: " + e.message; }
  try {
    const jobs = await call("/v1/fine_tuning/jobs");
    const tb = $("jobs").tBodies[0]; tb.textContent = "";
    for (const j of jobs.data) {
      const row = tb.insertRow();
      cell(row, j.id); cell(row, j.status, j.status === "failed" ? "error" : ""); cell(row, j.fine_tuned_model);
      cell(row, j.error ? j.error.message : "");
    }
  } catch (e) { $("who").textContent += " jobs: " + e.message; }
}
$("load").addEventListener("click", refresh);
$("upload").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = $("file").files[0]; if (!f) return;
  const form = new FormData(); form.append("purpose", "fine-tune"); form.append("file", f);
  $("result").textContent = "validating...";
  try { report(await call("/v1/files", {method: "POST", body: form})); }
  catch (e) { $("result").textContent = ""; const p = document.createElement("p"); p.id = "report-status";
    p.className = "error"; p.textContent = e.message; $("result").appendChild(p); }
  refresh();
});
</script></body></html>
"""
