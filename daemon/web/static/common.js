// Shared by the dashboard's pages. Every piece of text from the ledger is put into the
// page with textContent (never as markup), so names, errors and log lines stay text.
"use strict";
const Dropmesh = (() => {
  const token = document.querySelector('meta[name="dropmesh-token"]').content;

  async function post(url, body, isForm) {
    const opts = { method: "POST", headers: { "X-Dropmesh-Token": token }, credentials: "same-origin" };
    if (isForm) {
      opts.body = body;
    } else if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const res = await fetch(url, opts);
    let data = {};
    try { data = await res.json(); } catch (e) { data = {}; }
    if (!res.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail || res.status));
    return data;
  }

  async function get(url) {
    const res = await fetch(url, { credentials: "same-origin" });
    if (!res.ok) throw new Error(`${url}: ${res.status}`);
    return res.json();
  }

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "style") e.setAttribute("style", v);
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
    return e;
  }

  function clock(s) {
    if (s === null || s === undefined || s === "" || isNaN(s)) return "-";
    s = Math.max(0, Math.round(Number(s)));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    const two = (x) => String(x).padStart(2, "0");
    return h ? `${h}:${two(m)}:${two(r)}` : `${m}:${two(r)}`;
  }

  // Live updates: Server-Sent Events, falling back to polling `poll` every 2 s when the
  // browser has no EventSource or the stream keeps failing.
  function live(url, handlers, poll) {
    const badge = document.getElementById("live");
    let failures = 0, timer = null;
    const setBadge = (text, on) => { if (badge) { badge.textContent = text; badge.classList.toggle("on", on); } };
    function startPolling() {
      if (timer) return;
      setBadge("polling", true);
      timer = setInterval(() => poll().catch(() => setBadge("offline", false)), 2000);
    }
    if (!window.EventSource) { startPolling(); return; }
    const es = new EventSource(url);
    es.onopen = () => { failures = 0; setBadge("live", true); };
    es.onerror = () => {
      failures += 1;
      setBadge("reconnecting…", false);
      if (failures >= 5) { es.close(); startPolling(); }
    };
    for (const [name, fn] of Object.entries(handlers)) {
      es.addEventListener(name, (ev) => fn(JSON.parse(ev.data)));
    }
    return es;
  }

  // Browser notifications for jobs this page watches.
  const notified = (window.dropmeshNotified = window.dropmeshNotified || []);
  function notify(job) {
    const title = `dropmesh: ${job.project} ${job.state === "succeeded" ? "is ready" : job.state}`;
    const body = job.state === "failed" ? (job.error || "failed") : `job ${job.id}`;
    notified.push({ id: job.id, state: job.state, title });
    if (!("Notification" in window) || Notification.permission !== "granted") return;
    try { new Notification(title, { body, tag: job.id }); } catch (e) { /* some browsers need a service worker */ }
  }
  document.addEventListener("DOMContentLoaded", () => {
    const btn = document.getElementById("notify-btn");
    if (!btn) return;
    if (!("Notification" in window)) { btn.hidden = true; return; }
    const show = () => { btn.textContent = Notification.permission === "granted" ? "Notifications on" : "Notify me"; };
    show();
    btn.addEventListener("click", () => Notification.requestPermission().then(show));
  });

  return { token, post, get, el, clock, live, notify };
})();
