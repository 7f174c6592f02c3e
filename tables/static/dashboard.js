// Exchange Collector dashboard: polls the worker's JSON views and renders them; no build step.
"use strict";

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) tr.appendChild(cell instanceof Node ? cell : el("td", cell));
  return tr;
}

const num = (value, digits = 0) =>
  value === null || value === undefined ? "–" : Number(value).toLocaleString("en-US", { maximumFractionDigits: digits });
const numCell = (value, digits = 0) => el("td", num(value, digits), "num");
const stateCell = (state) => el("td", state, `state state-${state}`);

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.floor(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}
const since = (ms, now) => (ms ? duration(Math.max(now - ms, 0) / 1000) : "–");

function bytes(value) {
  if (!value) return "0 B";
  const units = ["B", "KB", "MB", "GB"];
  let index = 0;
  while (value >= 1024 && index < units.length - 1) { value /= 1024; index += 1; }
  return `${value.toFixed(index ? 1 : 0)} ${units[index]}`;
}

function percentiles(latency) {
  if (!latency) return "–";
  return ["p50", "p90", "p95", "p99"].map((p) => num(latency[p], 1)).join(" / ");
}

async function getJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function fill(tableId, rows) {
  const body = $(tableId).querySelector("tbody");
  body.replaceChildren(...rows);
}

// ---- sparklines: the last 15 minutes per exchange, from this page's own polls ------------------------
// Kept in sessionStorage, so a reload of the page keeps the picture.

const HISTORY_MS = 15 * 60 * 1000;
const HISTORY_KEY = "collector.dashboard.history";
const SPARK_WIDTH = 120, SPARK_HEIGHT = 26;

function loadHistory() {
  try { return JSON.parse(sessionStorage.getItem(HISTORY_KEY) || "{}"); } catch (_) { return {}; }
}
const history = loadHistory();

function remember(exchange, time, rate, p99) {
  const points = (history[exchange] = history[exchange] || []);
  points.push([time, rate, p99]);
  while (points.length && points[0][0] < time - HISTORY_MS) points.shift();
}

function sparkline(points, index, now, label, digits) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", SPARK_WIDTH);
  svg.setAttribute("height", SPARK_HEIGHT);
  svg.setAttribute("class", "spark");
  svg.dataset.series = label;
  const values = points.filter((p) => p[index] !== null && p[index] !== undefined);
  const top = Math.max(...values.map((p) => p[index]), 0) || 1;
  const x = (t) => ((t - (now - HISTORY_MS)) / HISTORY_MS) * SPARK_WIDTH;
  const y = (v) => SPARK_HEIGHT - 2 - (v / top) * (SPARK_HEIGHT - 4);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", values.map((p) => `${x(p[0]).toFixed(1)},${y(p[index]).toFixed(1)}`).join(" "));
  svg.appendChild(line);
  const title = document.createElementNS(ns, "title");
  const last = values.length ? values[values.length - 1][index] : null;
  title.textContent = `${label}, last 15 min: now ${num(last, digits)}, highest ${num(values.length ? top : null, digits)}`;
  svg.appendChild(title);
  return svg;
}

function sparkCell(exchange, now) {
  const td = el("td", undefined, "sparks");
  const points = history[exchange] || [];
  td.appendChild(sparkline(points, 1, now, "records/s", 1));
  td.appendChild(sparkline(points, 2, now, "p99 ms", 1));
  return td;
}

function renderCollectors(data) {
  const now = data.time;
  let rate = 0, records = 0, bytesPerSecond = 0, dead = 0, worstP99 = null;
  const rows = data.collectors.map((c) => {
    rate += c.rate; records += c.recordsTotal; bytesPerSecond += c.bytesPerSecond; dead += c.deadLettersTotal;
    const append = (c.latencyMs || {}).receive_to_append;
    if (append && append.p99 !== null) worstP99 = Math.max(worstP99 ?? 0, append.p99);
    const workers = Object.entries(c.workers || {}).map(([name, w]) =>
      `${name}: ${num(w.cpuPercent, 1)} %, ${bytes(w.rssBytes)}`).join("; ");
    remember(c.exchange, now, c.rate, append && append.p99 !== null ? append.p99 : null);
    const tr = row([
      el("td", c.exchange), stateCell(c.state), el("td", since(c.since, now)), numCell(c.rate, 1),
      el("td", bytes(c.bytesPerSecond) + "/s"),
      el("td", percentiles((c.latencyMs || {}).exchange_to_receive)),
      el("td", percentiles((c.latencyMs || {}).receive_to_append)),
      el("td", `${c.connectorsUp} / ${c.connectors}`), el("td", `${c.coinsSubscribed} / ${c.coins}`),
      el("td", c.books ? `${c.books.synced} / ${c.books.syncing}` : "–"),
      numCell(c.deadLettersTotal), el("td", workers || "–", "wrap"), sparkCell(c.exchange, now),
    ]);
    tr.dataset.exchange = c.exchange;
    return tr;
  });
  fill("collectors", rows);
  try { sessionStorage.setItem(HISTORY_KEY, JSON.stringify(history)); } catch (_) { /* storage full: keep it in memory */ }
  $("total-rate").textContent = num(rate, 1);
  $("total-records").textContent = num(records);
  $("total-bytes").textContent = bytes(bytesPerSecond);
  $("total-p99").textContent = worstP99 === null ? "–" : `${num(worstP99, 1)} ms`;
  $("total-dead").textContent = num(dead);
  const select = $("sub-exchange");
  const names = data.collectors.map((c) => c.exchange);
  if ([...select.options].map((o) => o.value).join() !== names.join()) {
    select.replaceChildren(...names.map((name) => { const o = el("option", name); o.value = name; return o; }));
  }
  return data.collectors;
}

function rate(value) { return value === null || value === undefined ? "–" : `${(value * 100).toFixed(0)} %`; }

function renderConnectors(data) {
  fill("connectors", data.connectors.map((c) => {
    const tr = row([
      el("td", c.connector), stateCell(c.state), el("td", duration(c.stateSeconds)), numCell(c.connects),
      numCell(c.drops), numCell(c.connectFailures), el("td", `${c.subscribeOk} / ${c.subscribeFailed}`),
      el("td", `${c.recoveries} / ${c.recoveryRequests}`),
      el("td", `${rate(c.connectionSuccessRate)} / ${rate(c.subscriptionSuccessRate)} / ${rate(c.recoverySuccessRate)}`),
      numCell(c.activeCoins), el("td", c.lastError || "", c.lastError ? "error" : ""),
    ]);
    tr.dataset.connector = c.connector;
    return tr;
  }));
}

function renderCoins(data) {
  let stale = 0;
  fill("coins", data.coins.map((c) => {
    if (c.stale) stale += 1;
    const types = Object.entries(c.records || {}).map(([t, n]) => `${t} ${num(n)}`).join(", ");
    const tr = row([
      el("td", c.exchange), el("td", c.symbol), stateCell(c.state),
      el("td", c.ageSeconds === null ? "never" : `${duration(c.ageSeconds)} ago`, c.stale ? "stale" : ""),
      numCell(c.rate, 1), numCell(c.recordsTotal), el("td", types || "–"),
      el("td", c.book || "–", c.book ? `state state-${c.book}` : ""),
      el("td", c.avgReceiveIntervalMs === null ? "–" : `${num(c.avgReceiveIntervalMs, 1)} ms`),
      el("td", `${c.subscribeRequests} / ${c.subscribeFailures}`), el("td", c.lastError || "", c.lastError ? "error" : ""),
    ]);
    tr.dataset.coin = `${c.exchange}:${c.symbol}`;
    return tr;
  }));
  offerBooks(data.coins.filter((c) => c.book).map((c) => `${c.exchange}:${c.symbol}`));
  return stale;
}

// ---- the depth ladder of one coin (GET /books/{exchange}/{symbol}) --------------------------------

function offerBooks(keys) {
  const select = $("book-coin");
  const current = [...select.options].map((o) => o.value).filter(Boolean);
  if (current.join() === keys.join()) return;
  const chosen = select.value;
  const options = keys.map((key) => { const o = el("option", key.replace(":", " ")); o.value = key; return o; });
  if (!options.length) options.push(el("option", "no order books collected"));
  select.replaceChildren(...options);
  if (keys.includes(chosen)) select.value = chosen;
  refreshBook();
}

function ladderRow(bid, price, ask, widest, side) {
  const bar = (level, kind) => {
    const td = el("td", level ? level[1] : "", `size ${kind}`);
    if (level) td.style.setProperty("--fill", `${Math.min(100, (100 * Number(level[1])) / widest).toFixed(1)}%`);
    return td;
  };
  const tr = row([bar(bid, "bid"), el("td", price, `num price ${side}`), bar(ask, "ask")]);
  tr.dataset.side = side;
  return tr;
}

function renderBook(book) {
  const levels = Number($("book-levels").value);
  const asks = book.asks.slice(0, levels);
  const bids = book.bids.slice(0, levels);
  const widest = Math.max(1e-18, ...asks.map((l) => Number(l[1])), ...bids.map((l) => Number(l[1])));
  const rows = asks.slice().reverse().map((ask) => ladderRow(null, ask[0], ask, widest, "ask"));
  if (bids.length && asks.length) {
    const spread = el("td", `spread ${(Number(asks[0][0]) - Number(bids[0][0])).toPrecision(6)}`, "spread");
    spread.colSpan = 3;
    const tr = document.createElement("tr");
    tr.appendChild(spread);
    rows.push(tr);
  }
  rows.push(...bids.map((bid) => ladderRow(bid, bid[0], null, widest, "bid")));
  fill("book-ladder", rows);
  const age = book.receivedAt ? `${((Date.now() - book.receivedAt) / 1000).toFixed(1)} s ago` : "";
  $("book-state").textContent = `${book.state}, update ${book.updateId ?? "–"} ${age}, served by ${book.servedBy}`;
  $("book-state").className = `state state-${book.state}`;
}

async function refreshBook() {
  const key = $("book-coin").value;
  if (!key) { fill("book-ladder", []); $("book-state").textContent = ""; return; }
  const [exchange, symbol] = [key.slice(0, key.indexOf(":")), key.slice(key.indexOf(":") + 1)];
  const levels = $("book-levels").value;
  try {
    const path = `/books/${encodeURIComponent(exchange)}/${symbol.replace("/", "-")}?levels=${levels}`;
    const response = await fetch(path, { cache: "no-store" });
    const body = await response.json();
    if (!response.ok) { fill("book-ladder", []); $("book-state").textContent = body.error || `HTTP ${response.status}`; return; }
    if ($("book-coin").value === key) renderBook(body);
  } catch (error) {
    $("book-state").textContent = error.message;
  }
}

function renderAlerts(data) {
  const items = data.latest.map((a) => {
    const li = el("li");
    li.appendChild(el("span", a.status, a.status));
    li.appendChild(document.createTextNode(` ${new Date(a.time).toISOString().slice(11, 19)} ${a.kind}: ${a.message}`));
    return li;
  });
  if (!items.length) items.push(el("li", "no alerts", "muted"));
  $("alerts").replaceChildren(...items);
  $("total-alerts").textContent = num(data.open.length);
  return data.open.length;
}

function renderSubscriptions(data) {
  const list = Array.isArray(data) ? data : (data.subscriptions || []);
  const items = list.map((s) => {
    const types = s.dataTypes || s.streams || [];
    const li = el("li", `${s.exchange} ${s.symbol} ${Array.isArray(types) ? types.join(", ") : types}`);
    li.dataset.subscription = `${s.exchange}:${s.symbol}`;
    return li;
  });
  if (!items.length) items.push(el("li", "none", "muted"));
  $("subscriptions").replaceChildren(...items);
}

function renderStatus(collectors, staleCoins, openAlerts) {
  const problems = [];
  for (const c of collectors) if (c.state !== "running") problems.push(`${c.exchange} ${c.state}`);
  if (staleCoins) problems.push(`${staleCoins} stale coins`);
  if (openAlerts) problems.push(`${openAlerts} open alerts`);
  const badge = $("status");
  badge.textContent = problems.length ? problems.join(", ") : "healthy";
  badge.className = `badge ${problems.length ? "bad" : "ok"}`;
}

async function refresh() {
  const problems = [];
  const settle = async (path, render) => {
    try { return render(await getJson(path)); } catch (error) { problems.push(error.message); return undefined; }
  };
  const [collectors, , stale, open] = await Promise.all([
    settle("/collectors", renderCollectors),
    settle("/connectors", renderConnectors),
    settle("/coins", renderCoins),
    settle("/alerts", renderAlerts),
    settle("/subscriptions", renderSubscriptions),
  ]);
  if (collectors) renderStatus(collectors, stale || 0, open || 0);
  await refreshBook();
  const error = $("fetch-error");
  error.hidden = problems.length === 0;
  error.textContent = problems.join("; ");
  $("updated").textContent = new Date().toLocaleTimeString();
}

async function submitSubscription(event) {
  event.preventDefault();
  const action = event.submitter ? event.submitter.value : "subscribe";
  const body = {
    exchange: $("sub-exchange").value,
    symbol: $("sub-symbol").value.trim().toUpperCase(),
    dataTypes: $("sub-types").value.split(",").map((t) => t.trim()).filter(Boolean),
  };
  const result = $("sub-result");
  result.textContent = `${action} ${body.symbol}…`;
  try {
    const response = await fetch("/subscriptions", {
      method: action === "subscribe" ? "POST" : "DELETE",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    const text = await response.text();
    let message = text;
    try {
      const parsed = JSON.parse(text);
      if (!response.ok) message = parsed.error || text;
      else message = parsed.group ? `accepted (connection group ${parsed.group})` : "accepted";
    } catch (_) { /* not JSON: show the text as it is */ }
    result.textContent = `${action} ${body.exchange} ${body.symbol}: HTTP ${response.status} ${message}`;
    result.className = response.ok ? "ok" : "error";
  } catch (error) {
    result.textContent = `${action} failed: ${error.message}`;
    result.className = "error";
  }
  refresh();
}

$("subscription-form").addEventListener("submit", submitSubscription);
$("book-coin").addEventListener("change", refreshBook);
$("book-levels").addEventListener("change", refreshBook);
refresh();
setInterval(refresh, POLL_MS);
