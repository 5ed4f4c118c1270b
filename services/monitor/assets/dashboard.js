// Flotilla's dashboard: the fleet overview, a task's story and the approvals waiting for a human,
// kept live by the monitor's server-sent events (/api/live). No external assets: the charts are
// drawn as SVG here.
"use strict";

const view = document.getElementById("view");
let latest = null;
let timer = null;

const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const time = (ms) => (ms ? new Date(ms).toISOString().slice(11, 23) : "");
const usd = (x) => "$" + Number(x || 0).toFixed(4);
const figure = (id, n, label) => `<div class="figure"><div class="n" id="${id}">${esc(n)}</div><div class="l">${esc(label)}</div></div>`;

function bars(values, failed, line) {
  const w = 600, h = 120, n = values.length || 1, bw = w / n;
  const max = Math.max(1, ...values.map((v, i) => v + (failed ? failed[i] : 0)));
  let out = `<svg class="chart" viewBox="0 0 ${w} ${h}" preserveAspectRatio="none">`;
  values.forEach((v, i) => {
    const hv = (v / max) * (h - 10), hf = failed ? (failed[i] / max) * (h - 10) : 0;
    out += `<rect class="bar" x="${i * bw + 1}" y="${h - hv}" width="${bw - 2}" height="${hv}"></rect>`;
    if (hf) out += `<rect class="fail" x="${i * bw + 1}" y="${h - hv - hf}" width="${bw - 2}" height="${hf}"></rect>`;
  });
  if (line) {
    const lmax = Math.max(1, ...line.filter((x) => x != null));
    const pts = line.map((v, i) => (v == null ? null : `${i * bw + bw / 2},${h - (v / lmax) * (h - 10)}`)).filter(Boolean);
    if (pts.length > 1) out += `<polyline class="line" points="${pts.join(" ")}"></polyline>`;
  }
  return out + "</svg>";
}

function table(rows, cols) {
  if (!rows.length) return '<p class="muted">none</p>';
  return `<table><tr>${cols.map((c) => `<th>${esc(c[0])}</th>`).join("")}</tr>${rows
    .map((r) => `<tr>${cols.map((c) => `<td${c[2] ? ' class="num"' : ""}>${c[1](r)}</td>`).join("")}</tr>`)
    .join("")}</table>`;
}

const counts = (obj) => Object.entries(obj || {}).map(([k, v]) => ({ k, v }));

function renderOverview(o) {
  const t = o.tasks, a = o.agents.by_status, c = o.charts;
  const alerts = o.alerts.filter((x) => x.kind !== "deadlock");
  view.className = "";
  view.innerHTML = `
  <section class="card wide"><h2>Tasks</h2><div class="figures">
    ${figure("tasks-submitted", t.submitted, "submitted")}${figure("tasks-completed", t.completed, "completed")}
    ${figure("tasks-failed", t.failed, "failed")}${figure("tasks-running", t.running, "running")}
    ${figure("queue-total", o.queue.total, "queued")}${figure("cost-hour", usd(o.cost.usd_last_hour), "cost, last hour")}
    ${figure("burn-rate", o.burn.tokens_per_minute, "tokens / min (5 min)")}${figure("deadlocks-total", o.deadlocks.total, "deadlocks")}
    ${figure("alerts-firing", o.alerts.length, "alerts firing")}
  </div></section>
  <section class="card"><h2>Throughput (10 s, last 5 min)</h2>${bars(c.completed, c.failed, null)}
    <p class="muted">completed (blue), failed (red)</p></section>
  <section class="card"><h2>Latency p50 (submit → completed)</h2>${bars(c.completed.map(() => 0), null, c.duration_p50_ms)}
    <p class="muted">latest p50: ${esc(c.duration_p50_ms.filter((x) => x != null).slice(-1)[0] ?? "–")} ms</p></section>
  <section class="card"><h2>Agents</h2><div class="figures">
    ${["idle", "busy", "draining", "error", "dead"].map((s) => figure("agents-" + s, a[s], s)).join("")}</div>
    <p class="muted">runners: <span id="runners">${esc(o.runners.join(", ") || "none")}</span></p></section>
  <section class="card"><h2>Queue by priority</h2>${table(counts(o.queue.by_priority), [["class", (r) => esc(r.k)], ["queued", (r) => esc(r.v), 1]])}
    <h2 style="margin-top:.8rem">Queue by tenant</h2>${table(counts(o.queue.by_tenant), [["tenant", (r) => esc(r.k)], ["queued", (r) => esc(r.v), 1]])}</section>
  <section class="card"><h2>Budgets and cost</h2>
    <p>cost in the last hour: <b>${usd(o.cost.usd_last_hour)}</b>; burn rate <b>${esc(o.burn.tokens_per_minute)}</b> tokens/min; tokens used <b>${esc(o.burn.tokens_total)}</b></p>
    <p>exhausted budgets: ${o.budgets.exhausted.length ? o.budgets.exhausted.map(esc).join(", ") : '<span class="muted">none</span>'}</p></section>
  <section class="card"><h2>Alerts</h2><div id="alerts">${alerts.length ? alerts.map((x) => `<div class="alert"><b>${esc(x.kind)}</b> ${esc(x.message)}</div>`).join("") : '<p class="muted">none firing</p>'}</div></section>
  <section class="card"><h2>Deadlocks</h2><div id="deadlocks">${o.deadlocks.firing.length ? o.deadlocks.firing.map((x) => `<div class="alert"><b>deadlock</b> ${x.deadlock.tasks.map((id) => `<a href="#/task/${encodeURIComponent(id)}">${esc(id)}</a>`).join(" → ")}<br><span class="muted">${esc((x.deadlock.waits || []).join("; "))}</span></div>`).join("") : '<p class="muted">none</p>'}</div>
    <p class="muted">waits open: ${esc(Object.entries(o.waits_open || {}).map(([k, v]) => k + " " + v).join(", ") || "none")}</p></section>
  <section class="card wide"><h2>Agents in detail</h2>${table(o.agents.list, [
    ["agent", (r) => esc(r.agent_id)], ["runner", (r) => esc(r.runner_id)], ["template", (r) => esc(r.template)],
    ["status", (r) => `<span class="s-${esc(r.status)}">${esc(r.status)}</span>`], ["state", (r) => esc(r.state)],
    ["in flight", (r) => `${esc(r.in_flight)}/${esc(r.concurrency)}`, 1], ["heartbeat", (r) => esc(r.heartbeat_age_ms) + " ms", 1]])}</section>`;
}

function renderApprovals(o) {
  view.className = "page";
  const rows = o.approvals;
  view.innerHTML = `<section class="card"><h2>Pending approvals</h2>
    ${o.can_decide ? "" : '<p class="muted">This monitor has no operator credential: decisions are made with <code>flotilla approve</code>.</p>'}
    ${table(rows, [["task", (r) => `<a href="#/task/${encodeURIComponent(r.task_id)}">${esc(r.task_id)}</a>`], ["agent", (r) => esc(r.agent_id)],
      ["question", (r) => esc(r.question)], ["asked", (r) => time(r.asked_at_ms)],
      ["", (r) => o.can_decide ? `<button class="approve" data-task="${esc(r.task_id)}" data-decision="approve">Approve</button> <button class="reject" data-task="${esc(r.task_id)}" data-decision="reject">Reject</button>` : ""]])}
    <p id="decision" class="muted"></p></section>`;
}

async function decide(task, decision) {
  const out = document.getElementById("decision");
  const r = await fetch(`/api/approvals/${encodeURIComponent(task)}/${decision}`, { method: "POST" });
  const body = await r.json();
  if (out) out.textContent = r.ok ? `${task}: ${body.decided}` : `${task}: ${body.error}`;
}

function renderTask(t) {
  view.className = "page";
  if (t.error) { view.innerHTML = `<section class="card"><p>${esc(t.error)}</p></section>`; return; }
  view.innerHTML = `<section class="card"><h2>Task</h2>
      <p><b id="task-id">${esc(t.task_id)}</b> — <span id="task-state" class="k-${esc(t.state)}">${esc(t.state)}</span>;
      attempts <span id="task-attempts">${esc(t.attempts.join(", ") || "none")}</span>; trace <code id="task-trace">${esc(t.trace_id || "none")}</code></p>
      ${t.approval ? `<p>waiting for approval: ${esc(t.approval.question)} — <a href="#/approvals">decide</a></p>` : ""}</section>
    <section class="card"><h2>Timeline</h2><ul class="timeline" id="task-events">${t.events.map((e) => `<li><span class="t">${time(e.at_ms)}</span>
      <b class="k-${esc(e.kind)}">${esc(e.kind)}</b> ${e.attempt ? "attempt " + esc(e.attempt) : ""} ${e.agent_id ? "on " + esc(e.agent_id) : ""}
      ${e.step ? "step " + esc(e.step) : ""} ${e.reason ? `<span class="muted">(${esc(e.reason)})</span>` : ""}
      ${e.error ? `<span class="k-failed">${esc(e.error.code)}: ${esc(e.error.message)}</span>` : ""} ${e.actor ? "by " + esc(e.actor) : ""}
      ${e.usage ? `<span class="muted">${esc(e.usage.prompt_tokens)}+${esc(e.usage.completion_tokens)} tokens</span>` : ""}
      ${e.cost_usd != null ? `<span class="muted">${usd(e.cost_usd)}</span>` : ""}</li>`).join("")}</ul></section>
    <section class="card"><h2>Tool calls</h2>${table(t.tool_calls, [["tool", (c) => esc(c.name)], ["arguments", (c) => `<pre>${esc(JSON.stringify(c.arguments ?? c.args ?? ""))}</pre>`],
      ["result", (c) => `<pre>${esc(JSON.stringify(c.result ?? c.error ?? "")).slice(0, 400)}</pre>`]])}</section>
    <section class="card"><h2>Children</h2>${t.children.length ? t.children.map((c) => `<a href="#/task/${encodeURIComponent(c)}">${esc(c)}</a>`).join("<br>") : '<p class="muted">none</p>'}</section>
    <section class="card"><h2>Messages</h2>${table(t.messages, [["at", (m) => time(m.at_ms)], ["kind", (m) => esc(m.kind)], ["from", (m) => esc(m.from)], ["to", (m) => esc(m.to)], ["id", (m) => `<code>${esc(m.id)}</code>`]])}</section>
    <section class="card"><h2>Budget entries</h2>${table(t.budget, [["seq", (b) => esc(b.seq), 1], ["op", (b) => esc(b.op)], ["at", (b) => time(b.at_ms)],
      ["request", (b) => `<pre>${esc(JSON.stringify(b.request))}</pre>`], ["answer", (b) => `<pre>${esc(JSON.stringify(b.reply))}</pre>`]])}</section>`;
}

function route() {
  clearInterval(timer);
  const h = location.hash || "#/";
  if (h.startsWith("#/task/")) {
    const id = decodeURIComponent(h.slice(7));
    const load = async () => renderTask(await (await fetch(`/api/task/${encodeURIComponent(id)}`)).json());
    load();
    timer = setInterval(load, 1000);
  } else if (h === "#/approvals") {
    if (latest) renderApprovals(latest);
  } else if (latest) {
    renderOverview(latest);
  }
}

function live() {
  const es = new EventSource("/api/live");
  const dot = document.getElementById("live");
  es.addEventListener("overview", (e) => {
    latest = JSON.parse(e.data);
    dot.className = "live on";
    document.getElementById("approvals-count").textContent = latest.approvals.length;
    const h = location.hash || "#/";
    if (h === "#/" || h === "#") renderOverview(latest);
    // The approvals page re-renders only when the list changes (so a click is not lost).
    else if (h === "#/approvals") {
      const key = JSON.stringify(latest.approvals) + latest.can_decide;
      if (key !== view.dataset.key) { renderApprovals(latest); view.dataset.key = key; }
    }
  });
  es.onerror = () => { dot.className = "live off"; };
}

view.addEventListener("click", (e) => {
  const b = e.target.closest("button[data-decision]");
  if (b) decide(b.dataset.task, b.dataset.decision);
});
document.getElementById("find").addEventListener("submit", (e) => {
  e.preventDefault();
  const id = document.getElementById("find-task").value.trim();
  if (id) location.hash = "#/task/" + encodeURIComponent(id);
});
window.addEventListener("hashchange", () => { view.dataset.key = ""; route(); });
live();
route();
