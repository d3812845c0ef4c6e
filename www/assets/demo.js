// The demo page: times one file down the kernel path and down user space, checks with the
// server's counters which path answered, and shows those counters live. Every figure on the
// page comes from a measurement here or from the stats endpoint; nothing is written in.
"use strict";

const compare = document.getElementById("compare");
const PROBE = compare.dataset.probe; // a small file the kernel caches
const STATS = compare.dataset.stats; // fsctl stats --json of this server
const LIVE_PERIOD_MS = 1000;
// User-space workers add their answers to the shared counters once a second, and the endpoint
// reuses a snapshot for half a second: a read this long after a batch includes all of it.
const SETTLE_MS = 1600;
const SPARK_POINTS = 60;
const SVG_NS = "http://www.w3.org/2000/svg";

const $ = (selector, root = document) => root.querySelector(selector);
const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));

// --- formatting ----------------------------------------------------------------------------

const fmtInt = n => Math.round(n).toLocaleString("en-US");
const fmtPct = x => (x === null || x === undefined ? "–" : `${(x * 100).toFixed(1)} %`);

function fmtMs(ms) {
  if (ms < 1) return `${Math.round(ms * 1000)} µs`;
  return `${ms.toFixed(ms < 10 ? 2 : 1)} ms`;
}

function fmtBytes(n) {
  if (n < 1024) return `${n} bytes`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

// An axis label: no trailing zeros.
function fmtTick(ms) {
  if (ms === 0) return "0";
  return ms < 1 ? `${Math.round(ms * 1000)} µs` : `${Number(ms.toFixed(2))} ms`;
}

function fmtRate(perSecond) {
  return perSecond < 10 ? perSecond.toFixed(1) : fmtInt(perSecond);
}

// --- the stats endpoint --------------------------------------------------------------------

async function readStats() {
  const response = await fetch(STATS, { cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function readStatsOrNull() {
  try {
    return await readStats();
  } catch (err) {
    return null;
  }
}

// --- live panel ----------------------------------------------------------------------------

const live = { paused: false, inflight: null, prev: null, history: [], updates: 0 };

function liveLoop() {
  if (!live.paused && !document.hidden && live.inflight === null) {
    live.inflight = pollOnce().finally(() => { live.inflight = null; });
  }
  setTimeout(liveLoop, LIVE_PERIOD_MS);
}

async function pollOnce() {
  let snap;
  try {
    snap = await readStats();
  } catch (err) {
    $("#live-state").textContent = `(stats unavailable: ${err.message})`;
    return;
  }
  if (!live.paused) showLive(snap);
}

function setLive(name, text) {
  $(`[data-live="${name}"]`).textContent = text;
}

function showLive(s) {
  const prev = live.prev;
  const dt = prev ? s.uptime_seconds - prev.uptime_seconds : 0;
  if (prev && dt > 0 && s.port === prev.port) {
    const k = Math.max(s.kernel_responses - prev.kernel_responses, 0) / dt;
    const u = Math.max(s.user_responses - prev.user_responses, 0) / dt;
    live.history.push({ k, u });
    if (live.history.length > SPARK_POINTS) live.history.shift();
    setLive("kernel_rate", `${fmtRate(k)} per second`);
    setLive("user_rate", `${fmtRate(u)} per second`);
    setLive("hit_rate_now", k + u > 0 ? `${fmtPct(k / (k + u))} just now` : "idle just now");
    drawSpark();
  }
  if (!prev || dt !== 0) live.prev = s;
  setLive("kernel_responses", fmtInt(s.kernel_responses));
  setLive("user_responses", fmtInt(s.user_responses));
  setLive("hit_rate", fmtPct(s.hit_rate));
  setLive("cached_files", fmtInt(s.cached_files));
  setLive("cached_bytes", fmtBytes(s.cached_bytes));
  setLive("handed_off", fmtInt(s.handed_off));
  const reasons = Object.entries(s.handoffs_by_reason || {}).filter(([, n]) => n > 0);
  setLive("handoff_reasons", reasons.length
    ? reasons.map(([why, n]) => `${why.replace(/_/g, " ")} ${fmtInt(n)}`).join(" · ")
    : "none yet");
  setLive("connections_owned", fmtInt(s.connections_owned));
  setLive("kernel_path", s.kernel_path ? "kernel path attached" : "kernel path off (fsctl up -n)");
  live.updates += 1;
  $("#live").dataset.updates = String(live.updates);
  $("#live-state").textContent =
    `(updated ${new Date().toLocaleTimeString()}, server up ${fmtUptime(s.uptime_seconds)})`;
}

function fmtUptime(seconds) {
  if (seconds < 120) return `${Math.floor(seconds)} s`;
  if (seconds < 7200) return `${Math.floor(seconds / 60)} min`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor(seconds / 60) % 60} min`;
}

function drawSpark() {
  const svg = $("#spark");
  const width = fitWidth(svg), height = 70, pad = 4;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const highest = Math.max(1, ...live.history.map(p => Math.max(p.k, p.u)));
  const top = niceStep(highest, 1);
  const x = i => pad + (i * (width - 2 * pad)) / (SPARK_POINTS - 1);
  const y = v => height - pad - (v / top) * (height - 2 * pad);
  svg.replaceChildren(
    svgEl("line", { class: "axis", x1: pad, y1: height - pad, x2: width - pad, y2: height - pad }),
    svgEl("text", { class: "tick", x: pad, y: 12 }, `${fmtRate(top)}/s`),
    ...["k", "u"].map(key => svgEl("polyline", {
      class: `series ${key === "k" ? "kernel" : "user"}`,
      points: live.history.map((p, i) => `${x(i + SPARK_POINTS - live.history.length)},${y(p[key])}`).join(" "),
    })));
  $("#spark-span").textContent = `${live.history.length} s`;
}

// --- the measured comparison ---------------------------------------------------------------

// The same file, one letter percent-encoded: the kernel leaves decoding to user space.
function spelledForUserSpace(path) {
  const cut = path.lastIndexOf("/") + 1;
  const name = path.slice(cut);
  const i = name.search(/[A-Za-z]/);
  const hex = name.charCodeAt(i).toString(16).toUpperCase();
  return `${path.slice(0, cut)}${name.slice(0, i)}%${hex}${name.slice(i + 1)}`;
}

// n sequential fetches of path?tag-i; returns their Resource Timing durations and body size.
async function batch(path, tag, n, init, progress) {
  performance.clearResourceTimings();
  const urls = [];
  let size = 0;
  for (let i = 0; i < n; i++) {
    const url = new URL(`${path}?${tag}-${i}`, location.href).href;
    const response = await fetch(url, init);
    const body = await response.arrayBuffer();
    if (!response.ok) throw new Error(`${path} answered ${response.status}`);
    size = body.byteLength;
    urls.push(url);
    if (i % 20 === 0) progress(i);
  }
  return { times: await timings(urls), size };
}

// Entries appear shortly after each body is read; wait a little for the last ones.
async function timings(urls) {
  for (let tries = 0; ; tries++) {
    const entries = urls.map(u => performance.getEntriesByName(u, "resource")[0]);
    if (entries.every(Boolean) || tries >= 40) {
      return entries.filter(Boolean).map(e =>
        e.requestStart > 0 ? e.responseEnd - e.requestStart : e.duration);
    }
    await sleep(50);
  }
}

function percentile(sorted, p) {
  const rank = Math.ceil((p / 100) * sorted.length) - 1;
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank))];
}

// What a batch of n should move: all on its own path (all user space without the kernel path).
function expected(key, n, kernelPathOn) {
  const inKernel = key === "kernel" && kernelPathOn;
  return { kernel: inKernel ? n : 0, user: inKernel ? 0 : n };
}

// Which path answered between two snapshots: the page's own stats request is a user answer.
function answered(before, after) {
  if (!before || !after || before.port !== after.port) return null;
  return {
    kernel: after.kernel_responses - before.kernel_responses,
    user: after.user_responses - before.user_responses - 1,
  };
}

async function measure(n) {
  const button = $("#run");
  const status = text => { $("#compare-status").textContent = text; };
  button.disabled = true;
  live.paused = true;
  try {
    if (live.inflight) await live.inflight;
    status("Letting the server's counters settle…");
    await sleep(SETTLE_MS);
    performance.setResourceTimingBufferSize(n + 100);
    const run = Date.now().toString(36);
    const kernelPath = PROBE;
    const userPath = spelledForUserSpace(PROBE);

    const s0 = await readStatsOrNull();
    const kernel = await batch(kernelPath, `k${run}`, n,
      { cache: "no-store", credentials: "omit" },
      i => status(`Kernel path: request ${i + 1} of ${n}…`));
    status("Reading the counters…");
    await sleep(SETTLE_MS);
    const s1 = await readStatsOrNull();
    const user = await batch(userPath, `u${run}`, n, { cache: "no-store" },
      i => status(`User-space path: request ${i + 1} of ${n}…`));
    status("Reading the counters…");
    await sleep(SETTLE_MS);
    const s2 = await readStatsOrNull();

    const results = [
      { key: "kernel", path: kernelPath, ...kernel, counts: answered(s0, s1) },
      { key: "user", path: userPath, ...user, counts: answered(s1, s2) },
    ];
    for (const r of results) r.sorted = [...r.times].sort((a, b) => a - b);
    showResults(results, n, s0);
    status(`Done: ${n} requests per path of a ${fmtBytes(kernel.size)} file, ` +
      `finished ${new Date().toLocaleTimeString()}.`);
  } catch (err) {
    status(`The comparison failed: ${err.message}`);
  } finally {
    live.paused = false;
    button.disabled = false;
  }
}

function showResults(results, n, before) {
  for (const r of results) {
    const card = $(`[data-path="${r.key}"]`);
    // text for people; data-value (ms or a count) for scripts and the browser test
    const field = (name, text, value = "", off = false) => {
      const el = $(`[data-field="${name}"]`, card);
      el.textContent = text;
      el.dataset.value = value;
      el.classList.toggle("off", off);
    };
    field("url", r.path);
    card.dataset.timed = r.sorted.length;
    for (const p of [50, 90, 99]) {
      const ms = r.sorted.length ? percentile(r.sorted, p) : null;
      const timed = p === 50 && r.sorted.length < n ? ` (${r.sorted.length} of ${n} timed)` : "";
      field(p === 50 ? "median" : `p${p}`, ms === null ? "no timings" : fmtMs(ms) + timed, ms ?? "");
    }
    if (r.counts) {
      const want = expected(r.key, n, before.kernel_path);
      for (const path of ["kernel", "user"]) {
        field(path, `${fmtInt(r.counts[path])} of ${fmtInt(n)}`, r.counts[path],
          r.counts[path] !== want[path]);
      }
    } else {
      field("kernel", "counters unavailable");
      field("user", "counters unavailable");
    }
  }
  $("#results").hidden = false;
  $("#verdict").hidden = false;
  $("#verdict").textContent = verdict(results, n, before);
  $("#chart-figure").hidden = false;
  drawChart(results);
  const step = timerStep(results);
  $("#timer-step").textContent = Number.isFinite(step)
    ? `The smallest step between two timings was ${fmtMs(step)}: browsers round these ` +
      "timestamps, so small differences move in steps of about that size."
    : "";
  lastResults = results;
}

let lastResults = null;
window.addEventListener("resize", () => {
  if (lastResults) drawChart(lastResults);
  if (live.history.length) drawSpark();
});

function verdict([kernel, user], n, before) {
  if (before && !before.kernel_path) {
    return "This server runs without the kernel path (fsctl up -n): user space answered both " +
      "batches, so the two cards time the same thing.";
  }
  if (!kernel.sorted.length || !user.sorted.length) return "Not enough timings to compare.";
  const k = percentile(kernel.sorted, 50), u = percentile(user.sorted, 50);
  let text = u >= k
    ? `Median per request: ${fmtMs(k)} from the kernel against ${fmtMs(u)} from user space, ` +
      `${(u / k).toFixed(1)} times faster.`
    : `Median per request: ${fmtMs(k)} from the kernel against ${fmtMs(u)} from user space; ` +
      "user space was not slower this time.";
  const off = [kernel, user].some(r => {
    const want = expected(r.key, n, true);
    return r.counts && (r.counts.kernel !== want.kernel || r.counts.user !== want.user);
  });
  if (off) text += " The counters moved differently from the requests (marked): other clients " +
    "used the server meanwhile, or requests went down the other path.";
  return text;
}

// --- drawing -------------------------------------------------------------------------------

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// A round step between axis ticks, so that about `ticks` of them cover v.
function niceStep(v, ticks) {
  const raw = v / ticks;
  const p = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 2.5, 5, 10].map(m => m * p).find(c => c >= raw);
}

// Draw in real pixels of the space the SVG gets, so text keeps its size on any screen.
function fitWidth(svg) {
  return Math.round(Math.max(280, Math.min(900, svg.parentElement.getBoundingClientRect().width)));
}

// The smallest step between two distinct timings: the browser's timer resolution, as seen.
function timerStep(results) {
  const microseconds = results.flatMap(r => r.sorted.map(ms => Math.round(ms * 1000)));
  const values = [...new Set(microseconds)].sort((a, b) => a - b).map(us => us / 1000);
  let step = Infinity;
  for (let i = 1; i < values.length; i++) step = Math.min(step, values[i] - values[i - 1]);
  return step;
}

// Each path's times sorted and drawn against their percentile, up to p99.
function drawChart(results) {
  const svg = $("#chart");
  const W = fitWidth(svg), H = Math.round(Math.max(200, Math.min(280, W * 0.45)));
  const left = 52, right = 12, top = 10, bottom = 36;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const shown = results.map(r => r.sorted.slice(0, Math.max(1, Math.ceil(r.sorted.length * 0.99))));
  const highest = Math.max(...shown.flat(), 1e-3);
  const step = niceStep(highest, 4);
  const ymax = step * Math.ceil(highest / step - 1e-9);
  const x = pct => left + (pct / 100) * (W - left - right);
  const y = ms => H - bottom - (ms / ymax) * (H - top - bottom);
  const parts = [];
  for (let i = 0; i * step <= ymax + 1e-9; i++) {
    const v = i * step;
    parts.push(svgEl("line", { class: i ? "gridline" : "axis", x1: left, x2: W - right, y1: y(v), y2: y(v) }));
    parts.push(svgEl("text", { class: "tick", x: left - 4, y: y(v) + 4, "text-anchor": "end" }, fmtTick(v)));
  }
  for (const pct of W >= 480 ? [0, 50, 90, 99] : [0, 50, 90]) {
    parts.push(svgEl("text", { class: "tick", x: x(pct), y: H - bottom + 14, "text-anchor": "middle" },
      pct ? `p${pct}` : "fastest"));
  }
  parts.push(svgEl("text", { class: "tick", x: (left + W - right) / 2, y: H - 4, "text-anchor": "middle" },
    "requests, fastest to slowest"));
  results.forEach((r, k) => {
    const n = r.sorted.length;
    const pts = shown[k].map((ms, i) => `${x(((i + 0.5) / n) * 100).toFixed(1)},${y(ms).toFixed(1)}`);
    parts.push(svgEl("polyline", { class: `series ${r.key}`, points: pts.join(" ") }));
    const median = percentile(r.sorted, 50);
    parts.push(svgEl("circle", { class: `dot ${r.key}`, cx: x(50), cy: y(median), r: 3 }));
  });
  svg.replaceChildren(...parts);
}

// --- start -----------------------------------------------------------------------------------

$("[data-probe-name]").textContent = PROBE;
$("#stats-link").href = STATS;
$("#compare-form").addEventListener("submit", event => {
  event.preventDefault();
  const input = $("#count");
  const n = Math.min(Number(input.max), Math.max(Number(input.min), Math.round(Number(input.value) || 0)));
  input.value = n;
  measure(n);
});
liveLoop();
