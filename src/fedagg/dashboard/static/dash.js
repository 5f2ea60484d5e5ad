// fedagg dashboard: hand-written, no build step, no dependencies. Reads the JSON endpoints
// under /api/ and draws tables and SVG line charts. Every text from the database goes in
// through textContent (never innerHTML).
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const COLORS = ["#2b6cb0", "#dd6b20", "#38a169", "#e53e3e", "#805ad5", "#d69e2e", "#319795",
  "#d53f8c", "#4a5568", "#3182ce", "#c05621", "#2f855a"];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

async function getJSON(url) {
  const r = await fetch(url, {cache: "no-store"});
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
  return data;
}

function fmt(v, digits) {
  if (v == null) return "–";
  if (typeof v === "number") {
    if (Number.isInteger(v)) return String(v);
    return Math.abs(v) >= 1e5 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : v.toFixed(digits ?? 4);
  }
  return String(v);
}
const pct = v => v == null ? "–" : (100 * v).toFixed(2) + "%";
const when = t => t == null ? "–" : new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19);
function bytes(n) {
  if (n == null) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + u[i];
}

function table(headers, rows, numeric) {
  const num = new Set(numeric || []);
  const thead = el("thead", {}, el("tr", {}, ...headers.map((h, i) => el("th", {class: num.has(i) ? "num" : "", text: h}))));
  const tbody = el("tbody");
  for (const row of rows) {
    tbody.append(el("tr", {}, ...row.map((c, i) => {
      const td = el("td", {class: num.has(i) ? "num" : ""});
      if (c instanceof Node) td.append(c); else td.textContent = c == null ? "–" : String(c);
      return td;
    })));
  }
  return el("table", {}, thead, tbody);
}

function badge(status) { return el("span", {class: "badge " + status, text: status}); }

// -- charts ----------------------------------------------------------------------------------
function ticks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || 10 * mag;
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
  return out;
}

const tick = t => Math.abs(t) >= 1e5 ? t.toExponential(1) : String(+t.toFixed(6));

// series: [{label, xs, ys}]; opts: {title, x, y, yMin, yMax}. Null values break the line.
function lineChart(opts, series) {
  const W = 520, H = 260, L = 56, R = 12, T = 10, B = 36;
  let xlo = Infinity, xhi = -Infinity, ylo = Infinity, yhi = -Infinity, points = 0;
  for (const s of series) s.ys.forEach((y, i) => {
    const x = s.xs[i];
    if (y == null || x == null || !isFinite(y) || !isFinite(x)) return;
    xlo = Math.min(xlo, x); xhi = Math.max(xhi, x); ylo = Math.min(ylo, y); yhi = Math.max(yhi, y); points++;
  });
  const box = el("div", {class: "chart", "data-chart": opts.id || opts.title});
  box.append(el("h3", {text: opts.title}));
  if (!points) { box.append(el("p", {class: "muted", text: "no data"})); return box; }
  if (opts.yMin != null) ylo = Math.min(ylo, opts.yMin);
  if (opts.yMax != null) yhi = Math.max(yhi, opts.yMax);
  if (yhi === ylo) { yhi += 1; ylo = Math.min(ylo, 0); }
  if (xhi === xlo) { xhi = xlo + 1; }
  const yt = ticks(ylo, yhi, 5), xt = ticks(xlo, xhi, 6);
  ylo = Math.min(ylo, yt[0]); yhi = Math.max(yhi, yt[yt.length - 1]);
  const sx = x => L + (x - xlo) / (xhi - xlo) * (W - L - R);
  const sy = y => H - B - (y - ylo) / (yhi - ylo) * (H - T - B);
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": opts.title});
  const grid = svg("g", {class: "grid"}), axis = svg("g", {class: "axis"});
  for (const t of yt) {
    grid.append(svg("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t)}));
    const lab = svg("text", {x: L - 6, y: sy(t) + 4, "text-anchor": "end"}); lab.textContent = tick(t); axis.append(lab);
  }
  for (const t of xt) {
    if (t < xlo || t > xhi) continue;
    const lab = svg("text", {x: sx(t), y: H - B + 16, "text-anchor": "middle"}); lab.textContent = tick(t); axis.append(lab);
  }
  axis.append(svg("path", {d: `M${L},${T} V${H - B} H${W - R}`, fill: "none"}));
  const xl = svg("text", {x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle"}); xl.textContent = opts.x; axis.append(xl);
  const yl = svg("text", {x: 12, y: (T + H - B) / 2, "text-anchor": "middle", transform: `rotate(-90 12 ${(T + H - B) / 2})`}); yl.textContent = opts.y; axis.append(yl);
  root.append(grid, axis);
  const legend = el("div", {class: "legend"});
  series.forEach((s, k) => {
    const color = s.color || COLORS[k % COLORS.length];
    let d = "", pen = false, n = 0;
    s.ys.forEach((y, i) => {
      const x = s.xs[i];
      if (y == null || x == null || !isFinite(y) || !isFinite(x)) { pen = false; return; }
      d += (pen ? "L" : "M") + sx(x).toFixed(1) + "," + sy(y).toFixed(1); pen = true; n++;
    });
    if (!n) return;
    if (n === 1) d += "h0.01";
    const p = svg("path", {class: "series", d, stroke: color, "data-points": n, "stroke-linecap": "round"});
    const title = svg("title", {}); title.textContent = s.label; p.append(title);
    root.append(p);
    const sw = el("i"); sw.style.background = color;
    legend.append(el("span", {}, sw, s.label));
  });
  box.append(root, legend);
  return box;
}

function charts(...boxes) { return el("div", {class: "charts"}, ...boxes); }
const has = (cols, k) => cols[k] && cols[k].some(v => v != null);

// -- pages -----------------------------------------------------------------------------------
async function runsPage(app) {
  const params = new URLSearchParams(location.search);
  const kind = el("select", {name: "kind"}, el("option", {value: "", text: "any kind"}));
  const status = el("select", {name: "status"}, el("option", {value: "", text: "any status"}));
  const name = el("input", {name: "name", placeholder: "name contains…", value: params.get("name") || ""});
  const compare = el("button", {type: "button", id: "compare-selected", text: "compare selected"});
  const form = el("form", {class: "filters"}, kind, status, name, compare);
  const body = el("div");
  app.replaceChildren(el("h1", {text: "runs"}), form, body);
  const selected = new Set();
  compare.addEventListener("click", () => { if (selected.size) location.href = "/compare?ids=" + [...selected].join(","); });
  let first = true;
  async function load() {
    const q = new URLSearchParams();
    for (const [k, v] of [["kind", kind.value], ["status", status.value], ["name", name.value]]) if (v) q.set(k, v);
    if (!first) history.replaceState(null, "", q.toString() ? "/?" + q : "/");
    const data = await getJSON("/api/runs" + (q.toString() ? "?" + q : ""));
    if (first) {
      for (const k of data.kinds) kind.append(el("option", {value: k, text: k}));
      for (const s of data.statuses) status.append(el("option", {value: s, text: s}));
      kind.value = params.get("kind") || ""; status.value = params.get("status") || "";
      first = false;
      if (kind.value || status.value) return load();
    }
    if (!data.exists) { body.replaceChildren(el("p", {class: "muted", text: "no run database at " + data.db + " yet"})); return; }
    const rows = data.runs.map(r => {
      const box = el("input", {type: "checkbox", value: r.id});
      if (selected.has(r.id)) box.checked = true;
      box.addEventListener("change", () => box.checked ? selected.add(r.id) : selected.delete(r.id));
      return [box, el("a", {href: "/runs/" + r.id, text: String(r.id)}), r.kind, el("a", {href: "/runs/" + r.id, text: r.name}),
        badge(r.status), r.rounds, pct(r.final_accuracy), when(r.started)];
    });
    body.replaceChildren(el("p", {class: "muted", text: `${data.runs.length} of ${data.total} runs in ${data.db}`}),
      table(["", "id", "kind", "name", "status", "rounds", "final accuracy", "started"], rows, [1, 5, 6]));
    body.querySelector("table").id = "runs";
  }
  for (const c of [kind, status]) c.addEventListener("change", load);
  let timer = null;
  name.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(load, 200); });
  form.addEventListener("submit", e => { e.preventDefault(); load(); });
  await load();
}

async function runPage(app) {
  const id = location.pathname.split("/").filter(Boolean)[1];
  const [run, cols] = await Promise.all([getJSON("/api/runs/" + id), getJSON("/api/runs/" + id + "/rounds")]);
  document.title = `run ${run.id}: ${run.name} · fedagg`;
  const s = run.summary || {};
  const last = k => { const v = (cols[k] || []).filter(x => x != null); return v.length ? v[v.length - 1] : null; };
  const card = (k, v) => el("div", {class: "card"}, el("div", {class: "k", text: k}), el("div", {class: "v", text: v}));
  const sum = k => (cols[k] || []).reduce((a, b) => a + (b || 0), 0);
  const x = cols.round, vt = cols.virtual_time;
  const acc = [["test_accuracy", "test"], ["client_accuracy", "clients (federated)"], ["train_accuracy", "train"]].filter(([k]) => has(cols, k));
  const loss = [["test_loss", "test"], ["client_loss", "clients"], ["train_loss", "train"]].filter(([k]) => has(cols, k));
  const ser = (pairs, xs) => pairs.map(([k, label]) => ({label, xs, ys: cols[k]}));
  const refusals = Object.entries(run.refusals || {}).sort((a, b) => b[1] - a[1]);
  app.replaceChildren(
    el("h1", {}, `run ${run.id}: ${run.name} `, badge(run.status)),
    el("p", {class: "muted", text: `${run.kind} · seed ${run.seed} · started ${when(run.started)} · ended ${when(run.ended)}`}),
    el("div", {class: "cards"}, card("rounds", String(run.rounds)), card("final accuracy", pct(s.final_accuracy ?? last("test_accuracy"))),
      card("final loss", fmt(last("test_loss"))), card("virtual time", fmt(last("virtual_time"), 1) + " s"),
      card("folded", String(sum("folded"))), card("dropped", String(sum("dropped"))), card("refused", String(sum("refused"))),
      card("bytes up", bytes(sum("bytes_up"))), card("bytes down", bytes(sum("bytes_down"))),
      ...(has(cols, "epsilon") ? [card("epsilon (DP)", fmt(last("epsilon")))] : [])),
    el("h2", {text: "learning"}),
    charts(
      lineChart({id: "accuracy-round", title: "accuracy against round", x: "round", y: "accuracy", yMin: 0, yMax: 1}, ser(acc, x)),
      lineChart({id: "loss-round", title: "loss against round", x: "round", y: "loss"}, ser(loss, x)),
      lineChart({id: "accuracy-time", title: "accuracy against virtual time", x: "virtual time (s)", y: "accuracy", yMin: 0, yMax: 1}, ser(acc, vt)),
      lineChart({id: "loss-time", title: "loss against virtual time", x: "virtual time (s)", y: "loss"}, ser(loss, vt))),
    el("h2", {text: "participation, staleness, bytes"}),
    charts(
      lineChart({id: "participation", title: "updates per round", x: "round", y: "updates", yMin: 0},
        ser([["folded", "folded"], ["dropped", "dropped"], ["refused", "refused"], ["late", "late"]].filter(([k]) => has(cols, k)), x)),
      lineChart({id: "staleness", title: "staleness", x: "round", y: "model versions", yMin: 0},
        ser([["staleness_mean", "mean"], ["staleness_max", "max"]].filter(([k]) => has(cols, k)), x)),
      lineChart({id: "bytes", title: "bytes per round", x: "round", y: "bytes", yMin: 0},
        ser([["bytes_up", "up (updates)"], ["bytes_down", "down (models)"]].filter(([k]) => has(cols, k)), x))),
    ...(has(cols, "epsilon") ? [el("h2", {text: "privacy"}), charts(
      lineChart({id: "epsilon", title: "epsilon spent against round", x: "round", y: "epsilon", yMin: 0},
        ser([["epsilon", "epsilon"]], x)))] : []),
    el("h2", {text: "refusals"}),
    refusals.length ? table(["reason", "updates refused"], refusals, [1]) : el("p", {class: "muted", text: "no update was refused"}),
    el("h2", {text: "summary"}),
    table(["key", "value"], Object.entries(s).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : fmt(v)])),
    el("h2", {text: "config"}),
    el("pre", {id: "config", text: JSON.stringify(run.config, null, 2)}));
}

async function comparePage(app) {
  const ids = new URLSearchParams(location.search).get("ids");
  if (!ids) {
    const data = await getJSON("/api/runs");
    const selected = new Set();
    const go = el("button", {type: "button", text: "compare", onclick: () => { if (selected.size) location.href = "/compare?ids=" + [...selected].join(","); }});
    const rows = data.runs.map(r => {
      const box = el("input", {type: "checkbox", value: r.id});
      box.addEventListener("change", () => box.checked ? selected.add(r.id) : selected.delete(r.id));
      return [box, String(r.id), r.kind, r.name, badge(r.status), r.rounds, pct(r.final_accuracy)];
    });
    app.replaceChildren(el("h1", {text: "compare runs"}), el("p", {class: "muted", text: "pick two runs or more"}),
      table(["", "id", "kind", "name", "status", "rounds", "final accuracy"], rows, [1, 5, 6]), el("p", {}, go));
    return;
  }
  const data = await getJSON("/api/compare?ids=" + encodeURIComponent(ids));
  const lab = r => `run ${r.id}: ${r.name}`;
  const ser = (xk, yk) => data.runs.map(r => ({label: lab(r), xs: r.series[xk], ys: r.series[yk]}));
  app.replaceChildren(
    el("h1", {text: "compare runs " + data.runs.map(r => r.id).join(", ")}),
    table(["id", "name", "kind", "status", "rounds", "final accuracy", "best accuracy"],
      data.runs.map(r => [el("a", {href: "/runs/" + r.id, text: String(r.id)}), r.name, r.kind, badge(r.status), r.rounds, pct(r.final_accuracy), pct(r.best_accuracy)]), [0, 4, 5, 6]),
    charts(
      lineChart({id: "compare-accuracy-round", title: "accuracy against round", x: "round", y: "accuracy", yMin: 0, yMax: 1}, ser("round", "test_accuracy")),
      lineChart({id: "compare-accuracy-time", title: "accuracy against virtual time", x: "virtual time (s)", y: "accuracy", yMin: 0, yMax: 1}, ser("virtual_time", "test_accuracy")),
      lineChart({id: "compare-loss-round", title: "loss against round", x: "round", y: "loss"}, ser("round", "test_loss"))),
    el("h2", {text: "config diff"}),
    data.diff.length
      ? table(["key", ...data.runs.map(r => "run " + r.id)], data.diff.map(d => [d.key, ...d.values.map(v => v == null ? "(unset)" : fmt(v))]))
      : el("p", {class: "muted", text: "the configs are identical"}));
  app.querySelector("table").id = "compared";
  const diff = app.querySelectorAll("table")[1]; if (diff) diff.id = "diff";
}

async function livePage(app) {
  let polls = 0;
  const card = (id, k) => el("div", {class: "card"}, el("div", {class: "k", text: k}), el("div", {class: "v", id: "live-" + id, text: "–"}));
  const bar = el("div"); const barText = el("span", {id: "live-progress", class: "muted"});
  const note = el("p", {id: "live-note", class: "muted"});
  const chartBox = el("div", {class: "charts"}); const clientsBox = el("div"); const refusedBox = el("div");
  app.replaceChildren(el("h1", {text: "live"}), note,
    el("div", {class: "cards"}, card("server", "server"), card("round", "round"), card("rounds-closed", "rounds closed"),
      card("version", "model version"), card("connected", "clients connected"), card("accepted", "uploads accepted"),
      card("duplicate", "duplicate uploads"), card("refused", "refused")),
    el("h2", {text: "this round"}), el("div", {class: "bar"}, bar), barText,
    el("h2", {text: "updates folded per round"}), chartBox,
    el("h2", {text: "refusals"}), refusedBox, el("h2", {text: "clients"}), clientsBox);
  const set = (id, v) => { const e = document.getElementById("live-" + id); if (e.textContent !== v) e.textContent = v; };
  let lastRounds = -1;
  async function poll() {
    try {
      const s = await getJSON("/api/live");
      polls++;
      document.body.dataset.polls = String(polls);
      document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
      if (!s.ok) { note.textContent = s.error; note.className = "error"; set("server", "–"); return; }
      const srv = s.server;
      note.className = "muted";
      note.textContent = `${s.state} · ${srv.running ? "server running" : "server not running"}${srv.note ? " (" + srv.note + ")" : ""}${s.finished ? " · finished" : ""}`;
      set("server", srv.running ? "running" : "stopped");
      set("round", String(s.round)); set("rounds-closed", String(s.rounds_closed)); set("version", String(s.version));
      const c = s.clients;
      set("connected", `${c.connected ?? "?"} of ${c.registered ?? "?"}`);
      set("accepted", String(s.uploads.accepted)); set("duplicate", String(s.uploads.duplicate)); set("refused", String(s.uploads.refused));
      const p = s.progress || {}, r = p.rounds || {};
      const disp = (r.dispatched || []).filter(v => v != null);
      const want = disp.length ? disp[disp.length - 1] : (c.registered || 0);
      const got = p.received ?? 0;
      bar.style.width = (want ? Math.min(100, 100 * got / want) : 0) + "%";
      barText.textContent = s.finished ? "the federation finished" : `round ${s.round}: ${got} updates received${want ? " of ~" + want : ""}`;
      if ((r.round || []).length && r.round.length !== lastRounds) {
        lastRounds = (r.round || []).length;
        chartBox.replaceChildren(lineChart({id: "live-folded", title: "updates per round", x: "round", y: "updates", yMin: 0},
          [["folded", "folded"], ["dropped", "dropped"], ["refused", "refused"]].map(([k, l]) => ({label: l, xs: r.round || [], ys: r[k] || []}))));
      }
      const reasons = [...Object.entries(s.uploads.refused_requests || {}).map(([k, v]) => [k, v.count, v.example]),
        ...Object.entries(s.uploads.refused_updates || {}).map(([k, v]) => ["update: " + k, v, ""])];
      refusedBox.replaceChildren(reasons.length ? table(["reason", "count", "last"], reasons, [1]) : el("p", {class: "muted", text: "none"}));
      const rows = [...c.list].sort((a, b) => (b.last_seen || 0) - (a.last_seen || 0)).slice(0, 200)
        .map(x => [x.name, x.connected ? "yes" : "no", x.accepted, when(x.last_seen)]);
      clientsBox.replaceChildren(table(["client", "connected", "accepted", "last seen"], rows, [2]));
    } catch (e) {
      note.textContent = "cannot reach the dashboard: " + e.message; note.className = "error";
    }
  }
  await poll();
  setInterval(poll, 1000);
}

async function missingPage(app) {
  app.replaceChildren(el("h1", {text: "not found"}), el("p", {}, "No such page or run. ", el("a", {href: "/", text: "All runs"})));
}

const PAGES = {runs: runsPage, run: runPage, compare: comparePage, live: livePage, missing: missingPage};

document.addEventListener("DOMContentLoaded", async () => {
  const page = document.body.dataset.page;
  const nav = document.querySelector(`[data-nav="${page === "run" ? "runs" : page}"]`);
  if (nav) nav.classList.add("active");
  const app = document.getElementById("app");
  const t0 = performance.now();
  try {
    await (PAGES[page] || missingPage)(app);
    document.body.dataset.readyAt = performance.now().toFixed(1);  // since navigation start
    document.body.dataset.rendered = (performance.now() - t0).toFixed(1);
  } catch (e) {
    app.replaceChildren(el("p", {class: "error", text: "error: " + e.message}));
    document.body.dataset.rendered = "error";
  }
});
