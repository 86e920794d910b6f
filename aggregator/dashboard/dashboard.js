// fedmq aggregator dashboard: polls /api/status (1 s) and /api/fleet (2 s) and renders them.
// Every string in the data comes from devices and is untrusted: it is only ever set with
// textContent or as an attribute value, never parsed as HTML. Charts are small hand-written SVG.
"use strict";

(function () {
  const STATUS_MS = 1000;
  const FLEET_MS = 2000;
  const FETCH_TIMEOUT_MS = 10000;  // a busy aggregator (2 cores, TensorFlow) may answer slowly
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = { accuracy: "#1f6feb", eval_loss: "#d1242f", train_loss: "#bf8700",
                   received: "#1a7f37", sent: "#8250df" };

  const $ = (id) => document.getElementById(id);
  const state = { lastOk: 0, lastStatus: null, fleetSeq: 0, fleetShown: -1, chartKey: "",
                  failures: { status: null, fleet: null }, fleetTimer: null };

  // -- formatting ------------------------------------------------------------------------------------

  function num(v) { return typeof v === "number" && isFinite(v) ? v : null; }

  function fmtInt(v) { v = num(v); return v === null ? "–" : Math.round(v).toLocaleString("en-US"); }

  function fmtBytes(v) {
    v = num(v);
    if (v === null) return "–";
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < u.length - 1) { v /= 1024; i++; }
    return (i === 0 ? String(Math.round(v)) : v.toFixed(v < 10 ? 2 : 1)) + " " + u[i];
  }

  function fmtDuration(s) {
    s = num(s);
    if (s === null) return "–";
    if (s < 0) s = 0;
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return (s / 86400).toFixed(1) + " d";
  }

  function fmtAgo(ts, now) {
    ts = num(ts);
    if (ts === null || ts <= 0) return "–";
    return fmtDuration(Math.max(0, now - ts)) + " ago";
  }

  function fmtMetric(v) { v = num(v); return v === null ? "–" : v.toFixed(4); }

  function fmtTime(ts) {
    ts = num(ts);
    if (ts === null) return "–";
    const d = new Date(ts * 1000);
    return d.toLocaleTimeString("en-GB", { hour12: false });
  }

  function text(id, v) {
    const el = $(id);
    const s = v === null || v === undefined ? "–" : String(v);
    if (el && el.textContent !== s) el.textContent = s;
  }

  function el(tag, cls, content) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (content !== undefined && content !== null) e.textContent = String(content);
    return e;
  }

  function svg(tag, attrs, content) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, String(attrs[k]));
    if (content !== undefined) e.textContent = String(content);
    return e;
  }

  function entries(obj) {  // a {reason: count} map, largest first; tolerant of junk
    if (!obj || typeof obj !== "object") return [];
    return Object.keys(obj).map((k) => [k, num(obj[k]) || 0]).filter((kv) => kv[1] > 0)
      .sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
  }

  function badge(id, label, kind) {
    const e = $(id);
    if (!e) return;
    if (e.textContent !== label) e.textContent = label;
    e.className = "badge " + kind;
  }

  // -- fetching --------------------------------------------------------------------------------------

  async function getJSON(url) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      const r = await fetch(url, { cache: "no-store", signal: ctl.signal, headers: { Accept: "application/json" } });
      if (!r.ok) throw new Error("HTTP " + r.status + " from " + url.split("?")[0]);
      return await r.json();
    } catch (e) {
      if (e && e.name === "AbortError") throw new Error("no answer from " + url.split("?")[0] + " in "
        + FETCH_TIMEOUT_MS / 1000 + " s");
      if (e instanceof TypeError) throw new Error("cannot reach " + url.split("?")[0]);
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  function showConnection() {
    const reason = state.failures.status || state.failures.fleet;
    const banner = $("banner");
    if (reason) {
      text("banner-reason", reason);
      text("banner-age", state.lastOk ? fmtAgo(state.lastOk / 1000, Date.now() / 1000) : "never");
      banner.hidden = false;
      document.body.classList.add("stale");
    } else {
      banner.hidden = true;
      document.body.classList.remove("stale");
    }
  }

  async function pollStatus() {
    try {
      const s = await getJSON("/api/status");
      state.failures.status = null;
      state.lastOk = Date.now();
      state.lastStatus = s;
      renderStatus(s);
    } catch (e) {
      state.failures.status = String((e && e.message) || e);
    }
    showConnection();
    setTimeout(pollStatus, STATUS_MS);
  }

  function fleetURL() {
    const p = new URLSearchParams();
    const st = $("fleet-state").value;
    const q = $("fleet-q").value.trim();
    if (st) p.set("state", st);
    if (q) p.set("q", q);
    const qs = p.toString();
    return { url: "/api/fleet" + (qs ? "?" + qs : ""), st: st, q: q };
  }

  async function pollFleet() {
    clearTimeout(state.fleetTimer);
    const seq = ++state.fleetSeq;
    const req = fleetURL();
    try {
      const f = await getJSON(req.url);
      state.failures.fleet = null;
      state.lastOk = Date.now();
      if (seq >= state.fleetShown) {  // a slower, older answer never overwrites a newer filter's rows
        state.fleetShown = seq;
        renderFleet(f, req);
      }
    } catch (e) {
      state.failures.fleet = String((e && e.message) || e);
    }
    showConnection();
    if (seq === state.fleetSeq) state.fleetTimer = setTimeout(pollFleet, FLEET_MS);
  }

  // -- status ----------------------------------------------------------------------------------------

  function renderStatus(s) {
    const now = num(s.ts) || Date.now() / 1000;
    const svc = s.service || {};
    text("service-id", svc.id);
    text("service-fleet", svc.fleet);
    text("service-run", svc.run);
    text("service-model", svc.model_id);
    $("service-run").title = String(svc.run ?? "");
    $("service-model").title = String(svc.model_id ?? "");
    text("service-version", svc.version);
    text("global-round", fmtInt(svc.global_round));
    $("global-round").dataset.value = String(num(svc.global_round) ?? "");
    text("service-uptime", num(svc.started) ? fmtDuration(now - svc.started) : "–");
    const st = String(svc.state || "unknown");
    badge("service-state", st, st === "online" ? "ok" : st === "done" ? "info" : "warn");
    badge("service-connected", svc.connected ? "connected" : "not connected", svc.connected ? "ok" : "bad");
    document.title = "fedmq · " + (svc.id || "aggregator") + " · round " + fmtInt(svc.global_round);

    renderRound(s.round, svc.next_round);
    renderCards(s.fleet || {});
    renderRejections(s.rejected_total);
    const rounds = Array.isArray(s.rounds) ? s.rounds : [];
    const last = rounds.length ? rounds[rounds.length - 1] : null;
    // the charts redraw only when a round closed, the last row changed (its bytes sent may come later)
    // or the page resized
    const key = rounds.length + ":" + JSON.stringify(last) + ":" + chartWidth();
    if (key !== state.chartKey) {
      state.chartKey = key;
      renderCharts(rounds);
      renderRoundsTable(rounds);
    }
    text("last-update", fmtTime(now));
  }

  function renderRound(r, next) {
    const body = $("round-body");
    const idle = $("round-idle");
    if (!r || typeof r !== "object") {
      body.hidden = true;
      idle.hidden = false;
      text("round-idle", "No round open." + (num(next) !== null ? " Next: round " + fmtInt(next) + "." : ""));
      text("round-number", "");
      $("round-progress").dataset.round = "";
      return;
    }
    body.hidden = false;
    idle.hidden = true;
    const asked = Math.max(0, num(r.asked) || 0);
    const received = Math.max(0, num(r.received) || 0);
    const rejected = Math.max(0, num(r.rejected) || 0);
    const quorum = Math.max(0, num(r.quorum) || 0);
    const scale = Math.max(asked, received + rejected, quorum, 1);
    text("round-number", "#" + fmtInt(r.round));
    text("round-received", fmtInt(received));
    text("round-quorum", fmtInt(quorum));
    text("round-asked", fmtInt(asked));
    text("round-rejected", fmtInt(rejected));
    text("round-deadline", fmtDuration(r.seconds_left));
    text("round-quorum-state", r.quorum_reached ? "reached" : "waiting");
    $("round-quorum-state").className = r.quorum_reached ? "ok-text" : "";
    const bar = $("round-progress");
    bar.dataset.round = String(r.round);
    bar.dataset.received = String(received);
    bar.dataset.asked = String(asked);
    bar.setAttribute("aria-valuemax", String(scale));
    bar.setAttribute("aria-valuenow", String(received));
    bar.title = received + " received, " + rejected + " rejected, quorum " + quorum + ", " + asked + " asked";
    $("round-bar-received").style.width = (100 * received / scale) + "%";
    $("round-bar-rejected").style.width = (100 * rejected / scale) + "%";
    $("round-quorum-mark").style.left = (100 * quorum / scale) + "%";
    const chips = $("round-reasons");
    chips.replaceChildren(...entries(r.rejected_by_reason).map(([k, v]) => el("span", "chip bad", k + " " + v)));
  }

  function renderCards(f) {
    text("online-count", fmtInt(f.online));
    text("known-count", fmtInt(f.known));
    text("excluded-count", fmtInt(f.excluded));
    $("online-count").dataset.value = String(num(f.online) ?? "");
    const order = ["online", "training", "idle", "error", "offline"];
    const st = f.states && typeof f.states === "object" ? f.states : {};
    const keys = order.filter((k) => k in st).concat(Object.keys(st).filter((k) => !order.includes(k)).sort());
    $("fleet-states").replaceChildren(...keys.map((k) => el("span", "chip state-" + k.replace(/[^a-z]/g, ""),
      k + " " + fmtInt(st[k]))));
  }

  function renderRejections(obj) {
    const box = $("chart-rejections");
    const rows = entries(obj);
    if (!rows.length) { box.replaceChildren(el("div", "muted", "none")); return; }
    const max = rows[0][1];
    box.replaceChildren(...rows.map(([k, v]) => {
      const row = el("div", "hbar");
      row.append(el("span", "hbar-label", k));
      const track = el("span", "hbar-track");
      const fill = el("span", "hbar-fill");
      fill.style.width = (100 * v / max) + "%";
      track.append(fill);
      row.append(track, el("span", "hbar-value", fmtInt(v)));
      row.title = k + ": " + v;
      return row;
    }));
  }

  // -- charts ----------------------------------------------------------------------------------------

  function chartWidth() {
    const c = $("chart-accuracy");
    return c ? Math.max(240, Math.floor(c.clientWidth)) : 400;
  }

  function niceTicks(lo, hi, n, integer) {
    if (!(hi > lo)) { hi = lo + 1; }
    const span = hi - lo;
    const raw = span / Math.max(1, n);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    let step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    if (integer) step = Math.max(1, Math.round(step === 2.5 * mag ? 2 * mag : step));
    const t0 = Math.floor(lo / step) * step;
    const t1 = Math.ceil(hi / step) * step;
    const ticks = [];
    for (let t = t0; t <= t1 + step / 2; t += step) ticks.push(+t.toPrecision(12));
    return ticks;
  }

  // series: [{name, color, points: [[x, y], ...]}]; opts: {yFmt, yMin, yMax}
  function lineChart(box, series, opts) {
    series = series.filter((s) => s.points.length);
    if (!series.length) {
      box.replaceChildren(el("div", "chart-empty muted", box.dataset.empty || "no data"));
      box.dataset.points = "0";
      return;
    }
    const W = chartWidth(), H = 180, L = 56, R = 12, T = 10, B = 26;
    const xs = series.flatMap((s) => s.points.map((p) => p[0]));
    const ys = series.flatMap((s) => s.points.map((p) => p[1]));
    let x0 = Math.min(...xs), x1 = Math.max(...xs);
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    let y0 = opts.yMin !== undefined ? opts.yMin : Math.min(...ys);
    let y1 = opts.yMax !== undefined ? opts.yMax : Math.max(...ys);
    if (opts.yMin === undefined && y0 > 0 && y0 < (y1 - y0)) y0 = 0;
    const yt = niceTicks(y0, y1, 4);
    y0 = Math.min(y0, yt[0]); y1 = Math.max(y1, yt[yt.length - 1]);
    const xt = niceTicks(x0, x1, Math.max(2, Math.floor((W - L - R) / 60)), true).filter((t) => t >= x0 && t <= x1);
    const sx = (x) => L + (W - L - R) * (x - x0) / (x1 - x0);
    const sy = (y) => T + (H - T - B) * (1 - (y - y0) / (y1 - y0 || 1));
    const root = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img" });
    const grid = svg("g", { class: "grid-lines" });
    for (const t of yt) {
      grid.append(svg("line", { x1: L, x2: W - R, y1: sy(t), y2: sy(t) }));
      root.append(svg("text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick" }, opts.yFmt(t)));
    }
    for (const t of xt) {
      root.append(svg("text", { x: sx(t), y: H - 8, "text-anchor": "middle", class: "tick" }, String(t)));
    }
    root.prepend(grid);
    root.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
    let n = 0;
    for (const s of series) {
      const pts = s.points.slice().sort((a, b) => a[0] - b[0]);
      const d = pts.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ");
      root.append(svg("path", { d: d, fill: "none", stroke: s.color, "stroke-width": 1.8,
                               "stroke-linejoin": "round" }));
      if (pts.length <= 60) {
        for (const p of pts) {
          const c = svg("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.6, fill: s.color });
          c.append(svg("title", {}, s.name + " · round " + p[0] + ": " + opts.yFmt(p[1], true)));
          root.append(c);
        }
      }
      n += pts.length;
    }
    const legend = el("div", "legend");
    for (const s of series) {
      const item = el("span", "legend-item");
      const sw = el("span", "swatch");
      sw.style.background = s.color;
      const lastPt = s.points[s.points.length - 1];
      item.append(sw, document.createTextNode(s.name + " (last " + opts.yFmt(lastPt[1], true) + ")"));
      legend.append(item);
    }
    box.dataset.points = String(n);
    box.replaceChildren(root, legend);
  }

  function pick(rounds, key) {
    const out = [];
    for (const r of rounds) {
      const x = num(r && r.round), y = num(r && r[key]);
      if (x !== null && y !== null) out.push([x, y]);
    }
    return out;
  }

  function renderCharts(rounds) {
    lineChart($("chart-accuracy"), [
      { name: "eval accuracy", color: COLORS.accuracy, points: pick(rounds, "eval_accuracy") },
    ], { yFmt: (v, exact) => (exact ? (100 * v).toFixed(1) : Math.round(100 * v)) + "%", yMin: 0, yMax: 1 });
    lineChart($("chart-loss"), [
      { name: "eval loss", color: COLORS.eval_loss, points: pick(rounds, "eval_loss") },
      { name: "train loss", color: COLORS.train_loss, points: pick(rounds, "train_loss") },
    ], { yFmt: (v, exact) => exact ? v.toFixed(4) : +v.toPrecision(3) + "" });
    // bytes: ticks at round numbers of one binary unit, chosen by the largest value
    const rx = pick(rounds, "bytes_received"), tx = pick(rounds, "bytes_sent");
    const top = Math.max(1, ...rx.map((p) => p[1]), ...tx.map((p) => p[1]));
    const k = Math.min(4, Math.floor(Math.log(top) / Math.log(1024)));
    const unit = Math.pow(1024, k), uname = ["B", "KiB", "MiB", "GiB", "TiB"][k];
    const scaled = (pts) => pts.map((p) => [p[0], p[1] / unit]);
    lineChart($("chart-bytes"), [
      { name: "received", color: COLORS.received, points: scaled(rx) },
      { name: "sent", color: COLORS.sent, points: scaled(tx) },
    ], { yFmt: (v, exact) => (exact ? fmtBytes(v * unit) : +v.toPrecision(4) + " " + uname), yMin: 0 });
  }

  function renderRoundsTable(rounds) {
    const body = $("rounds-table").tBodies[0];
    const rows = rounds.slice(-12).reverse().map((r) => {
      const tr = document.createElement("tr");
      const outcome = String(r.outcome || "");
      const loss = num(r.eval_loss) !== null ? r.eval_loss : r.train_loss;
      const rej = entries(r.rejected).map(([k, v]) => k + " " + v).join(", ");
      const cells = [
        [fmtInt(r.round), "num"], [outcome, "outcome-" + outcome.replace(/[^a-z]/g, "")],
        [fmtInt(r.participants), "num"], [fmtInt(r.asked), "num"], [fmtDuration(r.duration_s), "num"],
        [num(r.eval_accuracy) !== null ? (100 * r.eval_accuracy).toFixed(1) + "%" : "–", "num"],
        [fmtMetric(loss), "num"], [fmtBytes(r.bytes_received), "num"], [fmtBytes(r.bytes_sent), "num"],
        [rej || "–", rej ? "bad-text" : "muted"], [fmtTime(r.ts), "muted"],
      ];
      for (const [v, cls] of cells) tr.append(el("td", cls, v));
      return tr;
    });
    if (!rows.length) {
      const tr = document.createElement("tr");
      const td = el("td", "muted", "no round closed yet");
      td.colSpan = 11;
      tr.append(td);
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  // -- fleet -----------------------------------------------------------------------------------------

  function renderFleet(f, req) {
    const now = num(f.ts) || Date.now() / 1000;
    const devices = Array.isArray(f.devices) ? f.devices : [];
    const table = $("fleet-table");
    const rows = devices.map((d) => {
      const tr = document.createElement("tr");
      tr.dataset.agent = String(d.agent ?? "");
      const st = String(d.state || "");
      const excluded = String(d.excluded || "");
      const rej = entries(d.rejections);
      const rejTotal = rej.reduce((a, kv) => a + kv[1], 0);
      const stCell = el("td");
      stCell.append(el("span", "chip state-" + st.replace(/[^a-z]/g, ""), st || "?"));
      const rt = [d.runtime, d.interpreter].filter(Boolean).join(" / ");
      const rejCell = el("td", rejTotal ? "bad-text" : "muted",
        rejTotal ? rejTotal + (d.last_rejection ? " (last: " + d.last_rejection + ")" : "") : "–");
      if (rej.length) rejCell.title = rej.map(([k, v]) => k + ": " + v).join("\n");
      const errCell = el("td", d.last_error ? "bad-text clip" : "muted", d.last_error || "–");
      if (d.last_error) errCell.title = String(d.last_error);
      const refused = num(d.refused_streak) ? " · refused ×" + d.refused_streak : "";
      tr.append(
        el("td", "mono", d.agent), stCell, el("td", "clip", rt || "–"), el("td", "mono", d.version || "–"),
        el("td", "num", fmtInt(d.num_samples)),
        el("td", "num", fmtInt(d.rounds_contributed) + " / " + fmtInt(d.rounds_asked) + refused),
        el("td", "num", num(d.last_round) !== null && d.last_round >= 0 ? fmtInt(d.last_round) : "–"),
        el("td", "", fmtAgo(d.last_seen, now)), rejCell, errCell,
        el("td", excluded ? "bad-text" : "muted", excluded || "–"));
      if (excluded) tr.classList.add("excluded");
      if (!d.online) tr.classList.add("offline");
      return tr;
    });
    table.tBodies[0].replaceChildren(...rows);
    table.dataset.loaded = "true";
    table.dataset.state = req.st;  // which filter these rows answer (the test waits on them)
    table.dataset.q = req.q;
    table.dataset.rows = String(rows.length);
    $("fleet-empty").hidden = rows.length > 0;
    const total = num(f.total), matched = num(f.matched);
    let s = matched !== null && total !== null ? matched + " of " + total : "";
    if (matched !== null && rows.length < matched) s += " (first " + rows.length + " shown)";
    text("fleet-matched", s);
  }

  // -- start -----------------------------------------------------------------------------------------

  function onFilter() {  // a filter change fetches at once (debounced), not at the next 2 s tick
    clearTimeout(state.fleetTimer);
    state.fleetTimer = setTimeout(pollFleet, 150);
  }

  function start() {
    $("fleet-filters").addEventListener("submit", (e) => { e.preventDefault(); onFilter(); });
    $("fleet-state").addEventListener("change", onFilter);
    $("fleet-q").addEventListener("input", onFilter);
    let resize = null;
    window.addEventListener("resize", () => {
      clearTimeout(resize);
      resize = setTimeout(() => { if (state.lastStatus) renderStatus(state.lastStatus); }, 200);
    });
    pollStatus();
    pollFleet();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
