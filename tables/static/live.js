// Live market page: one /ws/exchange connection filtered to the chosen exchange, symbol and types.
// Endpoints come from /ws/info (this worker first, then the others); a dropped connection is retried
// with backoff over them, and the last list is remembered for when /ws/info itself cannot be reached.
"use strict";

const $ = (id) => document.getElementById(id);
const TAPE_ROWS = 60;
const BACKOFF_FIRST_MS = 1000;
const BACKOFF_MAX_MS = 30000;
const ENDPOINTS_KEY = "collector.live.endpoints";

// What the page shows, also read by the browser test.
const live = {
  state: "connecting", endpoint: null, filter: null, connects: 0, messages: 0,
  trades: 0, candles: 0, bbo: null, ticker: null, errors: [],
};
window.live = live;

let socket = null;
let attempt = 0;
let retryTimer = null;
let selection = null;

// ---- selection --------------------------------------------------------------------------------------

function currentSelection() {
  const types = [...document.querySelectorAll("#types input:checked")].map((box) => box.value);
  return { exchange: $("exchange").value, symbol: $("symbol").value.trim().toUpperCase().replace("-", "/"), types };
}

function filterOf(chosen) {
  // No type ticked means every type, as a missing `types` parameter does.
  return { exchanges: [chosen.exchange], symbols: [chosen.symbol], types: chosen.types.length ? chosen.types : null };
}

function query(chosen) {
  const params = new URLSearchParams({ exchanges: chosen.exchange, symbols: chosen.symbol });
  if (chosen.types.length) params.set("types", chosen.types.join(","));
  return params.toString();
}

async function loadChoices() {
  const params = new URLSearchParams(location.search);
  let coins = [];
  try {
    const response = await fetch("/coins", { cache: "no-store" });
    if (response.ok) coins = (await response.json()).coins || [];
  } catch (_) { /* a worker that serves no state: the fields stay free to type in */ }
  const exchanges = [...new Set(coins.map((c) => c.exchange))].sort();
  const wanted = params.get("exchange");
  if (wanted && !exchanges.includes(wanted)) exchanges.unshift(wanted);
  if (!exchanges.length) exchanges.push("binance");
  $("exchange").replaceChildren(...exchanges.map((name) => new Option(name, name)));
  if (wanted) $("exchange").value = wanted;
  const fillSymbols = () => {
    const symbols = coins.filter((c) => c.exchange === $("exchange").value).map((c) => c.symbol).sort();
    $("symbols").replaceChildren(...symbols.map((s) => new Option(s, s)));
    if (!params.get("symbol") && symbols.length && !symbols.includes($("symbol").value)) $("symbol").value = symbols[0];
  };
  $("exchange").addEventListener("change", fillSymbols);
  fillSymbols();
  if (params.get("symbol")) $("symbol").value = params.get("symbol");
  if (params.get("types")) {
    const types = params.get("types").split(",");
    for (const box of document.querySelectorAll("#types input")) box.checked = types.includes(box.value);
  }
}

// ---- connection -------------------------------------------------------------------------------------

function setStatus(state, text) {
  live.state = state;
  const badge = $("status");
  badge.textContent = text;
  badge.className = `badge ${state === "live" ? "ok" : state === "failed" ? "bad" : "warn"}`;
}

async function endpoints() {
  try {
    const response = await fetch("/ws/info", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const info = await response.json();
    const found = [info.endpoints.exchange, ...info.workers.filter((w) => !w.self).map((w) => w.exchange)];
    localStorage.setItem(ENDPOINTS_KEY, JSON.stringify(found));
    return found;
  } catch (error) {
    const remembered = JSON.parse(localStorage.getItem(ENDPOINTS_KEY) || "[]");
    const same = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws/exchange`;
    return remembered.length ? remembered : [same];
  }
}

async function connect() {
  clearTimeout(retryTimer);
  const candidates = await endpoints();
  const endpoint = candidates[attempt % candidates.length];
  const chosen = selection;
  setStatus("connecting", attempt ? `reconnecting (attempt ${attempt + 1})…` : "connecting…");
  const ws = new WebSocket(`${endpoint}?${query(chosen)}`);
  socket = ws;
  ws.onopen = () => {
    attempt = 0;
    live.connects += 1;
    live.endpoint = endpoint;
    $("endpoint").textContent = endpoint;
  };
  ws.onmessage = (event) => {
    if (ws !== socket) return;
    const message = JSON.parse(event.data);
    if (message.op) onControl(message);
    else onRecord(message);
  };
  ws.onclose = (event) => {
    if (ws !== socket) return;  // replaced on purpose
    const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** attempt) * (0.5 + Math.random() / 2);
    attempt += 1;
    setStatus("reconnecting", `disconnected (${event.code}${event.reason ? " " + event.reason : ""}); retry in ${(delay / 1000).toFixed(1)} s`);
    retryTimer = setTimeout(connect, delay);
  };
}

function changeSelection(chosen) {
  const previous = selection;
  selection = chosen;
  clearPanels();
  if (socket && socket.readyState === WebSocket.OPEN && previous) {
    // Unsubscribing every value leaves each list empty; the subscribe then fills them anew.
    const leave = { op: "unsubscribe", exchanges: [previous.exchange], symbols: [previous.symbol] };
    if (previous.types.length) leave.types = previous.types;
    socket.send(JSON.stringify(leave));
    socket.send(JSON.stringify({ op: "subscribe", ...filterOf(chosen) }));
  } else if (!socket || socket.readyState !== WebSocket.CONNECTING) {
    attempt = 0;
    connect();
  }
}

function onControl(message) {
  if (message.op === "subscribed") {
    live.filter = message.filter;
    $("filter").textContent = `filter: ${JSON.stringify(message.filter)}`;
    setStatus("live", "live");
  } else if (message.op === "error") {
    live.errors.push(message.message);
    $("filter").textContent = `error: ${message.message}`;
  }
}

// ---- records ----------------------------------------------------------------------------------------

function onRecord(record) {
  live.messages += 1;
  if (!selection || record.exchange !== selection.exchange || record.symbol !== selection.symbol) return;
  if (record.type === "trade") addTrade(record);
  else if (record.type === "bbo") showBbo(record.data);
  else if (record.type === "kline" && record.data.interval === "1m") addCandle(record.data);
  else if (record.type === "ticker") showTicker(record.data);
  else if (record.type === "depth") showDepth(record.data);
}

function addTrade(record) {
  const d = record.data;
  const tr = document.createElement("tr");
  tr.className = d.side;
  for (const [text, cls] of [[new Date(d.tradeTime).toISOString().slice(11, 23), ""], [d.side, "side"],
    [d.price, "num"], [d.quantity, "num"]]) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }
  const body = $("tape").querySelector("tbody");
  body.prepend(tr);
  while (body.rows.length > TAPE_ROWS) body.deleteRow(-1);
  live.trades += 1;
  $("trade-count").textContent = live.trades.toLocaleString("en-US");
}

function showBbo(d) {
  live.bbo = d;
  $("bid-price").textContent = d.bidPrice;
  $("bid-qty").textContent = d.bidQuantity;
  $("ask-price").textContent = d.askPrice;
  $("ask-qty").textContent = d.askQuantity;
  const spread = Number(d.askPrice) - Number(d.bidPrice);
  $("spread").textContent = Number.isFinite(spread) ? spread.toPrecision(6) : "–";
}

function showTicker(d) {
  live.ticker = d;
  $("ticker").textContent = `last ${d.last} · 24 h ${d.changePercent}% · high ${d.high} · low ${d.low} · volume ${d.volume}`;
}

// The hook for order books: once depth records exist, a ladder of bids and asks goes here.
function showDepth(d) {
  $("depth").hidden = false;
  $("depth").textContent = `depth ${d.snapshot ? "snapshot" : "update"} at ${d.lastUpdateId}`;
}

// ---- candles ----------------------------------------------------------------------------------------

let chart = null;
let candleSeries = null;
let bars = new Map();  // bar start (s) → candle

function setupChart() {
  if (!window.LightweightCharts) {
    $("chart-hint").textContent = "the chart library did not load";
    return;
  }
  chart = LightweightCharts.createChart($("chart"), {
    height: 360, layout: { background: { color: "#ffffff" }, textColor: "#1d2330" },
    timeScale: { timeVisible: true, secondsVisible: false, barSpacing: 14, rightOffset: 3 },
    rightPriceScale: { borderVisible: false },
    grid: { vertLines: { color: "#eef0f4" }, horzLines: { color: "#eef0f4" } },
  });
  candleSeries = chart.addCandlestickSeries();
  new ResizeObserver(() => chart.applyOptions({ width: $("chart").clientWidth })).observe($("chart"));
}

function addCandle(d) {
  const bar = { time: Math.floor(d.startTime / 1000), open: +d.open, high: +d.high, low: +d.low, close: +d.close };
  const newest = bars.size ? Math.max(...bars.keys()) : -Infinity;
  bars.set(bar.time, bar);
  live.candles = bars.size;
  $("candle-count").textContent = String(bars.size);
  $("chart-hint").hidden = true;
  if (!candleSeries) return;
  // A bar older than the newest (a late close) cannot be updated in place: redraw them all.
  if (bar.time >= newest) candleSeries.update(bar);
  else candleSeries.setData([...bars.values()].sort((a, b) => a.time - b.time));
}

function clearPanels() {
  bars = new Map();
  live.candles = 0;
  live.trades = 0;
  if (candleSeries) candleSeries.setData([]);
  $("candle-count").textContent = "0";
  $("chart-hint").hidden = false;
  $("tape").querySelector("tbody").replaceChildren();
  $("trade-count").textContent = "0";
  for (const id of ["bid-price", "bid-qty", "ask-price", "ask-qty", "spread", "ticker"]) $(id).textContent = "–";
  $("depth").hidden = true;
}

// For the browser test: drop the connection as a network failure would.
window.dropForTest = () => { if (socket) socket.close(4000, "dropped by the test"); };

// ---- start ------------------------------------------------------------------------------------------

$("selection").addEventListener("submit", (event) => {
  event.preventDefault();
  changeSelection(currentSelection());
});

(async () => {
  setupChart();
  await loadChoices();
  changeSelection(currentSelection());
})();
