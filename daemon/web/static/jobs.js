"use strict";
(() => {
  const { el, clock, post, get, live, notify } = Dropmesh;
  const table = document.getElementById("jobs");
  const tbody = table.querySelector("tbody");
  const ACTIVE = new Set(["queued", "running", "waiting"]);
  const watched = new Map(); // job id -> last state seen
  let received = Date.now();

  function filters() {
    return { state: table.dataset.state, project: table.dataset.project, page: table.dataset.page };
  }
  function matches(job) {
    const f = filters();
    if (f.project && job.project !== f.project) return false;
    if (f.state === "active") return ACTIVE.has(job.state);
    return !f.state || job.state === f.state;
  }

  function actionButtons(job) {
    const td = el("td", { class: "actions" });
    if (ACTIVE.has(job.state) && !job.cancel_requested) {
      const b = el("button", { type: "button", class: "small cancel", "data-id": job.id }, "Cancel");
      b.addEventListener("click", () => act(`/api/jobs/${job.id}/cancel`, b));
      td.append(b);
    } else if (!ACTIVE.has(job.state)) {
      const b = el("button", { type: "button", class: "small retry", "data-id": job.id }, "Retry");
      b.addEventListener("click", () => act(`/api/jobs/${job.id}/retry`, b));
      td.append(b);
    }
    return td;
  }

  async function act(url, button) {
    button.disabled = true;
    try { await post(url, {}); } catch (e) { alert(e.message); } finally { button.disabled = false; }
  }

  function renderRow(job) {
    const pct = (job.progress * 100).toFixed(1);
    const bars = el("div", { class: "stagebars" });
    for (const s of job.stages) bars.append(el("i", { class: s.state, title: `${s.name} ${s.state}`, style: `--p: ${s.progress}` }));
    let note = job.error || "";
    if (job.cancel_requested && job.state === "running") note = "cancelling";
    const tr = el("tr", { "data-id": job.id, "data-state": job.state },
      el("td", {}, el("a", { href: `/jobs/${job.id}` }, job.id)),
      el("td", { class: "project" }, job.project),
      el("td", {}, el("span", { class: `state ${job.state}` }, job.state)),
      el("td", { class: "stage" }, job.stage || "-"),
      el("td", { class: "progress" },
        el("div", { class: "bar" }, el("span", { style: `width: ${pct}%` })),
        el("span", { class: "pct" }, ` ${pct}%`), bars),
      el("td", { class: "elapsed", "data-s": job.elapsed_s ?? "" }, clock(job.elapsed_s)),
      el("td", { class: "eta", "data-s": job.eta_s ?? "" }, clock(job.eta_s)),
      el("td", { class: "host" }, job.host || "-"),
      el("td", { class: "attempts" }, `${job.attempts}/${job.max_attempts}`),
      el("td", { class: "note" }, note),
      actionButtons(job));
    return tr;
  }

  function watch(job) {
    const before = watched.get(job.id);
    if (before && ACTIVE.has(before) && (job.state === "succeeded" || job.state === "failed")) notify(job);
    if (ACTIVE.has(job.state) || before) watched.set(job.id, job.state);
  }

  function update(jobs) {
    received = Date.now();
    for (const job of jobs) {
      watch(job);
      const row = tbody.querySelector(`tr[data-id="${CSS.escape(job.id)}"]`);
      if (row) {
        if (matches(job)) row.replaceWith(renderRow(job)); else row.remove();
      } else if (matches(job) && Number(table.dataset.page || 1) === 1) {
        scheduleRefresh();
      }
    }
  }

  async function refresh() {
    const f = filters();
    const q = new URLSearchParams({ page: f.page || 1 });
    if (f.state) q.set("state", f.state);
    if (f.project) q.set("project", f.project);
    const data = await get(`/api/jobs?${q}`);
    received = Date.now();
    tbody.replaceChildren(...data.jobs.map((j) => { watch(j); return renderRow(j); }));
    document.getElementById("total").textContent = `${data.total} job(s)`;
    document.getElementById("pageno").textContent = `page ${data.page} of ${data.pages}`;
    const empty = document.getElementById("empty");
    if (empty) empty.hidden = data.jobs.length > 0;
  }
  let pending = null;
  function scheduleRefresh() {
    if (pending) return;
    pending = setTimeout(() => { pending = null; refresh().catch(() => {}); }, 300);
  }

  // Elapsed and ETA tick between updates.
  setInterval(() => {
    const dt = (Date.now() - received) / 1000;
    for (const row of tbody.rows) {
      const running = row.dataset.state === "running";
      for (const cls of ["elapsed", "eta"]) {
        const td = row.querySelector(`td.${cls}`);
        if (!td || td.dataset.s === "") continue;
        const base = Number(td.dataset.s);
        td.textContent = clock(running ? (cls === "elapsed" ? base + dt : Math.max(0, base - dt)) : base);
      }
    }
  }, 1000);

  document.querySelectorAll("#filters select").forEach((s) =>
    s.addEventListener("change", () => document.getElementById("filters").submit()));

  // Rows rendered by the server get their buttons and live cells from the same code.
  refresh().catch(() => {});
  live("/api/stream", {
    jobs: update,
    events: (evs) => { if (evs.some((e) => ["queued", "succeeded", "failed", "cancelled"].includes(e.kind))) scheduleRefresh(); },
    reload: () => scheduleRefresh(),
  }, refresh);

  // New jobs.
  const status = document.getElementById("newjob-status");
  async function follow(req) {
    status.textContent = `request ${req.request} written to the inbox; waiting for the daemon…`;
    for (let i = 0; i < 600; i++) {
      await new Promise((r) => setTimeout(r, 1000));
      let s;
      try { s = await get(req.status_url); } catch (e) { continue; }
      if (s.status === "accepted") {
        status.replaceChildren("job ", el("a", { href: `/jobs/${s.job.id}`, id: "new-job-link" }, s.job.id), ` queued for ${s.job.project}`);
        scheduleRefresh();
        return;
      }
      if (s.status === "rejected") { status.textContent = `rejected: ${s.error}`; return; }
    }
  }
  document.getElementById("upload-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = ev.target;
    const data = new FormData(form);
    if (!document.getElementById("photos").files.length) { status.textContent = "choose some photos first"; return; }
    status.textContent = "uploading…";
    try { follow(await post("/api/uploads", data, true)); } catch (e) { status.textContent = `upload refused: ${e.message}`; }
  });
  document.getElementById("folder-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = new FormData(ev.target);
    const body = { images: f.get("images"), quality: f.get("quality"), formats: f.getAll("formats") };
    if (f.get("project")) body.project = f.get("project");
    try { follow(await post("/api/jobs", body)); } catch (e) { status.textContent = `refused: ${e.message}`; }
  });
})();
