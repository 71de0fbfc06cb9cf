// wstunnel console: reads the server's state from its event stream (api/events: a snapshot,
// then updates), acts through the JSON API (POST with the X-CSRF-Token the snapshot carries).
// Everything the server sends is put in the page as text (textContent), never as HTML.
"use strict";

const SHOWN_TUNNELS = 300; // cards in the page at once; the filter finds the others

const state = {
  server: null,
  tunnels: new Map(), // id -> row
  inFlight: [],
  inFlightTotal: 0,
  errors: [],
  blocked: [],
  csrf: "",
  skewMs: 0, // server clock minus ours
  snapshots: 0,
  updates: 0,
};
const cards = new Map(); // id -> card element
let source = null;
let filterText = "";

const $ = (id) => document.getElementById(id);

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// -- formatting -------------------------------------------------------------------------------

function serverNow() {
  return (Date.now() + state.skewMs) / 1000;
}

function ago(epoch) {
  if (epoch === null || epoch === undefined) return "-";
  return duration(Math.max(0, serverNow() - epoch)) + " ago";
}

function duration(secs) {
  if (secs < 60) return (secs < 10 ? secs.toFixed(1) : Math.floor(secs)) + " s";
  const m = Math.floor(secs / 60), s = Math.floor(secs % 60);
  if (m < 60) return `${m} min ${s} s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m % 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

function clock(epoch) {
  if (epoch === null || epoch === undefined) return "";
  return new Date(epoch * 1000).toLocaleString();
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}

// A time shown as an age, kept current by the one-second timer.
function timeNode(epoch, tag) {
  const node = el(tag || "span", { class: "ago", title: clock(epoch) }, ago(epoch));
  if (epoch !== null && epoch !== undefined) node.dataset.epoch = String(epoch);
  return node;
}

function refreshAges() {
  for (const node of document.querySelectorAll(".ago[data-epoch]")) {
    node.textContent = ago(Number(node.dataset.epoch));
  }
  if (state.server) $("f-uptime").textContent = duration(Math.max(0, serverNow() - state.server.started));
}

// -- the stream -------------------------------------------------------------------------------

function connect() {
  if (source) source.close();
  source = new EventSource("api/events");
  source.addEventListener("snapshot", (event) => {
    const doc = JSON.parse(event.data);
    state.snapshots++;
    applySnapshot(doc);
    setLive(true);
  });
  source.addEventListener("update", (event) => {
    state.updates++;
    applyUpdate(JSON.parse(event.data));
  });
  source.onerror = () => {
    setLive(false);
    // A refusal (401, 403, 429) closes the EventSource for good: ask the API why.
    if (source.readyState === EventSource.CLOSED) probe();
  };
}

async function probe() {
  let response;
  try {
    response = await fetch("api/state", { credentials: "same-origin", cache: "no-store" });
  } catch (error) {
    setTimeout(connect, 3000);
    return;
  }
  if (response.ok) { connect(); return; }
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) { showLogin(""); return; }
  showRefused(body.error || `HTTP ${response.status}`);
}

function setLive(on) {
  const live = $("live");
  live.textContent = on ? "live" : "reconnecting";
  live.className = "pill " + (on ? "on" : "off");
  document.body.dataset.snapshots = String(state.snapshots);
  document.body.dataset.updates = String(state.updates);
}

function showLogin(text) {
  $("live").textContent = "logged out";
  $("console").hidden = true;
  $("refused").hidden = true;
  $("login").hidden = false;
  $("login-message").textContent = text;
  $("password").focus();
}

function showRefused(text) {
  $("live").textContent = "refused";
  $("console").hidden = true;
  $("login").hidden = true;
  $("refused").hidden = false;
  $("refused-text").textContent = text;
}

function applySnapshot(doc) {
  state.csrf = doc.csrf_token || state.csrf;
  $("logout").hidden = !doc.viewer || doc.viewer.access !== "password";
  state.tunnels = new Map(doc.tunnels.map((row) => [row.id, row]));
  for (const card of cards.values()) card.remove();
  cards.clear();
  state.inFlight = doc.in_flight;
  state.inFlightTotal = doc.in_flight_total;
  state.errors = doc.errors;
  state.blocked = doc.blocked;
  applyServer(doc.server);
  $("login").hidden = true;
  $("refused").hidden = true;
  $("console").hidden = false;
  renderTunnels();
  renderInFlight();
  renderErrors();
  renderBlocked();
}

function applyUpdate(doc) {
  if (doc.server) applyServer(doc.server);
  for (const row of doc.tunnels || []) {
    state.tunnels.set(row.id, row);
    const card = cards.get(row.id);
    if (card) {
      const fresh = tunnelCard(row);
      card.replaceWith(fresh);
      cards.set(row.id, fresh);
    }
  }
  for (const [id, times] of Object.entries(doc.activity || {})) {
    // Its clients' last activity only (their pings): the rest of the row stands.
    const row = state.tunnels.get(id);
    if (!row || row.clients.length !== times.length) continue;
    row.clients.forEach((client, i) => { client.last_activity = times[i]; });
    const card = cards.get(id);
    if (card) {
      const fresh = tunnelCard(row);
      card.replaceWith(fresh);
      cards.set(id, fresh);
    }
  }
  for (const id of doc.removed || []) {
    state.tunnels.delete(id);
    const card = cards.get(id);
    if (card) { card.remove(); cards.delete(id); }
  }
  if ((doc.tunnels || []).some((row) => !cards.has(row.id)) || (doc.removed || []).length) {
    renderTunnels();
  } else {
    countTunnels();
  }
  if (doc.in_flight) {
    state.inFlight = doc.in_flight;
    state.inFlightTotal = doc.in_flight_total;
    renderInFlight();
  }
  if (doc.errors) {
    state.errors = state.errors.concat(doc.errors).slice(-100);
    renderErrors();
  }
  if (doc.blocked) {
    state.blocked = doc.blocked;
    renderBlocked();
  }
  document.body.dataset.updates = String(state.updates);
}

function applyServer(server) {
  state.server = server;
  state.skewMs = server.now * 1000 - Date.now();
  $("version").textContent = server.version;
  $("draining").hidden = !server.draining;
  $("drain").disabled = server.draining;
  $("f-tunnels").textContent = server.tunnels;
  $("f-clients").textContent = server.clients;
  $("f-transports").textContent = Object.entries(server.clients_by_transport)
    .map(([name, n]) => `${n} ${name === "longpoll" ? "long-poll" : "WebSocket"}`).join(", ");
  $("f-rate").textContent = server.requests_per_sec.toFixed(1);
  $("f-total").textContent = `${server.requests_total} in all`;
  $("f-queue").textContent = server.queue_depth;
  $("f-pending").textContent = `${server.pending} pending`;
  $("f-in").textContent = bytes(server.bytes_in);
  $("f-out").textContent = bytes(server.bytes_out);
  $("f-listening").textContent = server.listening.join("  ");
  refreshAges();
}

// -- tunnels ----------------------------------------------------------------------------------

function matches(row) {
  if (!filterText) return true;
  const words = [row.token, row.blocked ? "blocked" : ""];
  for (const c of row.clients) words.push(c.address, c.version, c.protocol, c.transport);
  const haystack = words.join(" ").toLowerCase();
  return filterText.split(/\s+/).every((word) => haystack.includes(word));
}

function renderTunnels() {
  const rows = [...state.tunnels.values()].filter(matches)
    .sort((a, b) => a.token.localeCompare(b.token) || a.id.localeCompare(b.id));
  const shown = rows.slice(0, SHOWN_TUNNELS);
  const list = $("tunnels");
  const wanted = new Set(shown.map((row) => row.id));
  for (const [id, card] of cards) {
    if (!wanted.has(id)) { card.remove(); cards.delete(id); }
  }
  let previous = null;
  for (const row of shown) {
    let card = cards.get(row.id);
    if (!card) { card = tunnelCard(row); cards.set(row.id, card); }
    const place = previous ? previous.nextSibling : list.firstChild;
    if (place !== card) list.insertBefore(card, place);
    previous = card;
  }
  $("tunnels-note").textContent = rows.length > shown.length
    ? `Showing ${shown.length} of ${rows.length}: narrow the filter to see the others.`
    : (rows.length === 0 ? (state.tunnels.size ? "No tunnel matches the filter." : "No tunnels.") : "");
  countTunnels();
}

function countTunnels() {
  $("tunnel-count").textContent = `(${state.tunnels.size})`;
}

function outcomeLine(kind, outcome) {
  const ok = kind === "success";
  if (!outcome) {
    return el("div", { class: "outcome" }, el("span", { class: "tag", text: ok ? "Last OK" : "Last error" }),
      " ", el("span", { class: "muted", text: "none yet" }));
  }
  return el("div", { class: "outcome " + (ok ? "ok" : "bad"), "data-kind": kind },
    el("span", { class: "tag", text: ok ? "Last OK" : "Last error" }), " ",
    el("span", { class: "status", text: String(outcome.status) }), " ",
    outcome.reason, " · ", timeNode(outcome.time), " · from ",
    el("span", { class: "mono", text: outcome.client_address }));
}

function tunnelCard(row) {
  const clientItems = row.clients.map((c) => el("li", {
      class: "client", "data-protocol": c.protocol, "data-transport": c.transport },
    el("div", { class: "line" },
      el("span", { class: "mono", text: c.address }),
      el("span", { class: "proto " + c.protocol, text: c.protocol }),
      el("span", { text: c.transport === "longpoll" ? "long-poll" : "WebSocket" }),
      el("span", { class: "muted", text: `version ${c.version}` })),
    el("div", { class: "line muted" },
      el("span", {}, "connected ", timeNode(c.connected_since)),
      el("span", {}, "active ", timeNode(c.last_activity)))));
  const blockButton = row.blocked
    ? el("button", { type: "button", class: "quiet", "data-action": "unblock", text: "Unblock" })
    : el("button", { type: "button", class: "danger", "data-action": "block", text: "Block token",
      "data-question": "Really block?" });
  const disconnectButton = el("button", { type: "button", class: "danger", "data-action": "disconnect",
    text: "Disconnect clients", "data-question": "Really disconnect?",
    disabled: row.clients.length ? undefined : "disabled" });
  const card = el("article", {
      class: "tunnel" + (row.blocked ? " is-blocked" : ""), "data-id": row.id, "data-token": row.token },
    el("header", {},
      el("span", { class: "token", text: row.token }),
      row.blocked ? el("span", { class: "badge blocked", text: "blocked" }) : null,
      row.clients.length ? null : el("span", { class: "badge idle", text: "no client" }),
      el("span", { class: "spacer" }),
      el("span", { class: "muted" }, "active ", timeNode(row.last_activity))),
    el("div", { class: "counts" },
      el("span", {}, el("b", { class: "pending", text: String(row.pending) }), " pending"),
      el("span", {}, el("b", { class: "completed", text: String(row.completed) }), " completed"),
      el("span", {}, el("b", { class: "errored", text: String(row.errored) }), " errored"),
      el("span", {}, el("b", { text: String(row.clients.length) }), row.clients.length === 1 ? " client" : " clients")),
    outcomeLine("success", row.last_success),
    outcomeLine("error", row.last_error),
    row.clients.length ? el("ul", { class: "clients", "aria-label": "Clients" }, ...clientItems) : null,
    el("div", { class: "buttons" }, disconnectButton, blockButton));
  for (const button of card.querySelectorAll("button[data-question]")) showArmed(button);
  return card;
}

// -- lists ------------------------------------------------------------------------------------

function fillTable(id, rows, emptyId) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...rows);
  $(id).parentElement.hidden = rows.length === 0;
  $(emptyId).hidden = rows.length !== 0;
}

function renderInFlight() {
  fillTable("inflight", state.inFlight.map((r) => el("tr", { "data-tunnel": r.tunnel },
    el("td", {}, timeNode(r.since)),
    el("td", { class: "mono", text: r.method }),
    el("td", { class: "path", text: r.path }),
    el("td", { class: "mono", text: r.token }),
    el("td", { class: "mono", text: r.client_address }),
    el("td", { text: r.state }))), "inflight-empty");
  $("inflight-count").textContent = state.inFlightTotal > state.inFlight.length
    ? `(${state.inFlight.length} oldest of ${state.inFlightTotal})` : `(${state.inFlightTotal})`;
}

function renderErrors() {
  const rows = state.errors.slice().reverse().map((e) => el("tr", {},
    el("td", {}, timeNode(e.time)),
    el("td", { class: "status-bad", text: String(e.status) }),
    el("td", { text: e.reason }),
    el("td", { class: "mono", text: e.token }),
    el("td", { class: "path", text: `${e.method} ${e.path}` }),
    el("td", { class: "mono", text: e.client_address })));
  fillTable("errors", rows, "errors-empty");
  $("error-count").textContent = `(${state.errors.length})`;
}

function renderBlocked() {
  fillTable("blocked", state.blocked.map((b) => el("tr", { "data-id": b.id },
    el("td", { class: "mono", text: b.token }),
    el("td", {}, timeNode(b.since)),
    el("td", { text: b.by }),
    el("td", {}, el("button", { type: "button", class: "quiet", "data-action": "unblock", "data-id": b.id,
      text: "Unblock" })))), "blocked-empty");
  $("blocked-count").textContent = `(${state.blocked.length})`;
}

// -- actions ----------------------------------------------------------------------------------

function say(text, good) {
  const message = $("message");
  message.textContent = text;
  message.className = "message " + (good ? "good" : "bad");
}

async function post(path) {
  const response = await fetch(path, {
    method: "POST", credentials: "same-origin", cache: "no-store",
    headers: { "X-CSRF-Token": state.csrf },
  });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) showLogin("Your session ended: log in again.");
  return { ok: response.ok, body, status: response.status };
}

// Destructive buttons ask twice: the first click arms them for a few seconds. The arming is
// kept by key (tunnel and action), so a card redrawn by an update meanwhile stays armed.
const ARMED_MS = 5000;
const armedUntil = new Map(); // key -> time

function armedKey(button) {
  const holder = button.closest("[data-id]");
  return `${button.dataset.id || (holder && holder.dataset.id) || ""}/${button.dataset.action || button.id}`;
}

function showArmed(button) {
  const until = armedUntil.get(armedKey(button));
  if (!until || until < Date.now()) return;
  if (!button.dataset.label) button.dataset.label = button.textContent;
  button.textContent = button.dataset.question || "Really?";
  button.classList.add("armed");
  setTimeout(() => disarm(button), until - Date.now());
}

function disarm(button) {
  if (button.dataset.label) button.textContent = button.dataset.label;
  button.classList.remove("armed");
}

function armed(button, question) {
  const key = armedKey(button);
  const until = armedUntil.get(key);
  if (until && until >= Date.now()) {
    armedUntil.delete(key);
    disarm(button);
    return true;
  }
  armedUntil.set(key, Date.now() + ARMED_MS);
  button.dataset.question = question;
  showArmed(button);
  return false;
}

async function onTunnelAction(event) {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const holder = button.closest("[data-id]");
  const id = button.dataset.id || (holder && holder.dataset.id);
  const action = button.dataset.action;
  const token = holder && holder.dataset.token ? holder.dataset.token
    : (state.blocked.find((b) => b.id === id) || {}).token || "";
  if (action === "block" && !armed(button, "Really block?")) return;
  if (action === "disconnect" && !armed(button, "Really disconnect?")) return;
  button.disabled = true;
  const result = await post(`api/tunnels/${encodeURIComponent(id)}/${action}`);
  button.disabled = false;
  if (result.ok) {
    const done = { block: "blocked: its requests now get 403", unblock: "unblocked",
      disconnect: `disconnected (${result.body.clients} client(s))` }[action];
    say(`${token} ${done}`, true);
  } else {
    say(result.body.error || `HTTP ${result.status}`, false);
  }
}

async function onDrain(event) {
  const button = event.currentTarget;
  if (!armed(button, "Really drain? New tunnels and requests get 503")) return;
  const result = await post("api/drain");
  say(result.ok ? "Draining: requests in flight finish, then tunnels close." :
    (result.body.error || `HTTP ${result.status}`), result.ok);
}

async function onLogin(event) {
  event.preventDefault();
  const password = $("password").value;
  const response = await fetch("api/login", {
    method: "POST", credentials: "same-origin", cache: "no-store",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ password }),
  });
  const body = await response.json().catch(() => ({}));
  if (response.ok) {
    $("password").value = "";
    $("login").hidden = true;
    connect();
  } else {
    $("login-message").textContent = body.error || `HTTP ${response.status}`;
  }
}

async function onLogout() {
  await post("api/logout");
  if (source) source.close();
  $("logout").hidden = true;
  showLogin("Logged out.");
}

function start() {
  $("tunnels").addEventListener("click", onTunnelAction);
  $("blocked").addEventListener("click", onTunnelAction);
  $("drain").addEventListener("click", onDrain);
  $("login-form").addEventListener("submit", onLogin);
  $("logout").addEventListener("click", onLogout);
  $("filter").addEventListener("input", () => {
    filterText = $("filter").value.trim().toLowerCase();
    renderTunnels();
  });
  setInterval(refreshAges, 1000);
  connect();
}

document.addEventListener("DOMContentLoaded", start);
