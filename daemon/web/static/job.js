"use strict";
(() => {
  const { el, clock, post, get, live, notify } = Dropmesh;
  const root = document.getElementById("job");
  const id = root.dataset.id;
  const ACTIVE = new Set(["queued", "running", "waiting"]);
  let lastState = root.dataset.state;
  let received = Date.now();
  let current = null;

  function setText(elId, text) { const e = document.getElementById(elId); if (e) e.textContent = text; }

  function showJob(job) {
    current = job;
    received = Date.now();
    if (ACTIVE.has(lastState) && (job.state === "succeeded" || job.state === "failed")) notify(job);
    lastState = job.state;
    root.dataset.state = job.state;
    const st = document.getElementById("state");
    st.textContent = job.cancel_requested && job.state === "running" ? "cancelling" : job.state;
    st.className = `state ${job.state}`;
    setText("stage", job.stage || "");
    document.getElementById("bar").style.width = `${(job.progress * 100).toFixed(1)}%`;
    setText("pct", `${(job.progress * 100).toFixed(1)}%`);
    setText("host", job.host || "-");
    setText("attempts", `${job.attempts}/${job.max_attempts}`);
    setText("error", job.error || "");
    document.getElementById("elapsed").dataset.s = job.elapsed_s ?? "";
    document.getElementById("eta").dataset.s = job.eta_s ?? "";
    document.getElementById("cancel-btn").disabled = !ACTIVE.has(job.state);
    document.getElementById("retry-btn").disabled = ACTIVE.has(job.state);
    document.getElementById("reexport-btn").disabled = ACTIVE.has(job.state);
    const rows = job.stages.map((s) => el("tr", { "data-name": s.name },
      el("td", {}, s.name),
      el("td", {}, el("span", { class: `state ${s.state}` }, s.state)),
      el("td", {}, el("div", { class: "bar" }, el("span", { style: `width: ${(s.progress * 100).toFixed(1)}%` }))),
      el("td", {}, s.started_at ? s.started_at.slice(11, 19) : "-"),
      el("td", {}, s.duration_s == null ? "-" : `${s.duration_s.toFixed(1)} s`),
      el("td", {}, s.peak_rss_mb ? s.peak_rss_mb.toFixed(0) : "-"),
      el("td", {}, s.device || "-"),
      el("td", {}, s.message || "")));
    document.querySelector("#stages tbody").replaceChildren(...rows);
  }

  function showExports(exports) {
    const list = document.getElementById("downloads");
    list.replaceChildren(...exports.map((e) => el("li", {},
      el("a", { href: e.url, download: "" }, e.filename), " ",
      el("small", {}, `${e.format} · ${e.size_mb.toFixed(2)} MB`))));
    const glb = exports.find((e) => e.format === "glb");
    const holder = document.querySelector(".view3d");
    const viewer = document.getElementById("viewer");
    if (glb) {
      const src = `${glb.url}?inline=1&v=${encodeURIComponent(glb.sha256.slice(0, 12))}`;
      if (!viewer) {
        const mv = el("model-viewer", { id: "viewer", src, "camera-controls": "", "auto-rotate": "", exposure: "1.1", alt: "3D view" });
        holder.replaceChildren(mv);
      } else if (!viewer.getAttribute("src").startsWith(glb.url)) {
        viewer.setAttribute("src", src);
      }
    }
    const png = exports.find((e) => e.format === "png");
    if (png && !document.getElementById("preview")) {
      document.querySelector(".preview").replaceChildren(el("img", { id: "preview", src: `${png.url}?inline=1`, alt: "preview" }));
    }
  }

  const log = document.getElementById("log");
  function appendLog(text) {
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.append(document.createTextNode(text));
    if (log.textContent.length > 400000) log.textContent = log.textContent.slice(-300000);
    if (atBottom) log.scrollTop = log.scrollHeight;
  }
  const events = document.getElementById("events");
  function appendEvents(evs) {
    for (const e of evs) events.append(el("li", {}, `${e.at} ${e.kind}: ${e.message}`));
  }

  setInterval(() => {
    const dt = (Date.now() - received) / 1000;
    const running = lastState === "running";
    for (const [name, sign] of [["elapsed", 1], ["eta", -1]]) {
      const e = document.getElementById(name);
      if (e.dataset.s === "") { e.textContent = "-"; continue; }
      const v = Number(e.dataset.s) + (running ? sign * dt : 0);
      e.textContent = clock(Math.max(0, v));
    }
  }, 1000);

  const status = document.getElementById("action-status");
  async function act(url, body) {
    status.textContent = "…";
    try { const r = await post(url, body); status.textContent = r.stages ? `queued again from ${r.stages[0]}` : r.state; }
    catch (e) { status.textContent = e.message; }
  }
  document.getElementById("cancel-btn").addEventListener("click", () => act(`/api/jobs/${id}/cancel`, {}));
  document.getElementById("retry-btn").addEventListener("click", () =>
    act(`/api/jobs/${id}/retry`, { from_stage: document.getElementById("from-stage").value }));
  document.getElementById("reexport-btn").addEventListener("click", () => {
    const formats = [...document.querySelectorAll(".refmt:checked")].map((c) => c.value);
    if (!formats.length) { status.textContent = "tick a format to export"; return; }
    act(`/api/jobs/${id}/reexport`, { formats });
  });

  let pollAfter = 0;
  live(`/api/jobs/${id}/stream`, {
    job: showJob,
    exports: showExports,
    log: (d) => appendLog(d.text),
    events: (evs) => { pollAfter = evs[evs.length - 1].id; appendEvents(evs); },
  }, async () => {
    const job = await get(`/api/jobs/${id}`);
    showJob(job);
    showExports(job.exports);
    const evs = (await get(`/api/jobs/${id}/events?after=${pollAfter}`)).events;
    if (evs.length) { pollAfter = evs[evs.length - 1].id; appendEvents(evs); }
  });
})();
