// The page's own checks of what a web app does through the tunnel: a fetch with a body, an
// EventSource and a WebSocket. Each result is shown on the page and kept in window.results,
// which the test reads back (results.done once every check has settled).
"use strict";

const results = { checks: {}, done: false };
window.results = results;
const TIMEOUT_MS = 20000;
const WEBSOCKET_MESSAGE = 64 * 1024;

function report(name, ok, detail) {
  results.checks[name] = { ok, detail };
  const item = document.createElement("li");
  item.className = ok ? "ok" : "failed";
  item.textContent = `${name}: ${detail}`;
  document.getElementById("checks").append(item);
}

function withDeadline(what, promise) {
  const late = new Promise((_, reject) =>
    setTimeout(() => reject(new Error(`no answer within ${TIMEOUT_MS / 1000} s`)), TIMEOUT_MS));
  return Promise.race([promise, late]);
}

async function checkFetch() {
  const body = "hello from the page";
  const response = await fetch("api?from=fetch", { method: "POST", body });
  const seen = await response.json();
  if (response.status !== 200 || seen.body !== body || seen.method !== "POST") {
    throw new Error(`status ${response.status}, backend saw ${JSON.stringify(seen).slice(0, 200)}`);
  }
  return `POST answered ${response.status}; the backend read the body whole`;
}

function checkEventSource() {
  const wanted = 3;
  return new Promise((resolve, reject) => {
    const source = new EventSource("events?n=3&gap=0.2");
    const ids = [];
    source.onmessage = (event) => {
      ids.push(event.lastEventId);
      if (ids.length === wanted) {
        source.close(); // before the stream ends: no reconnection
        if (ids.join() === "0,1,2") resolve(`${wanted} events, one at a time, in order`);
        else reject(new Error(`events out of order: ${ids.join()}`));
      }
    };
    source.onerror = () => {
      source.close();
      reject(new Error(`EventSource failed after ${ids.length} event(s)`));
    };
  });
}

function checkWebSocket() {
  const url = new URL("ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const sent = new Uint8Array(WEBSOCKET_MESSAGE);
  for (let i = 0; i < sent.length; i++) sent[i] = (i * 7 + (i >> 8)) & 0xff;
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(url);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => socket.send(sent);
    socket.onmessage = (event) => {
      const echoed = new Uint8Array(event.data);
      const same = echoed.length === sent.length && echoed.every((byte, i) => byte === sent[i]);
      socket.close(1000, "done");
      if (same) resolve(`a ${sent.length / 1024} KiB message echoed intact`);
      else reject(new Error(`echo differs: ${echoed.length} bytes back`));
    };
    socket.onerror = () => reject(new Error("the WebSocket failed (handshake refused?)"));
    socket.onclose = (event) => {
      if (!event.wasClean) reject(new Error(`closed with code ${event.code} before the echo`));
    };
  });
}

async function main() {
  const navigation = performance.getEntriesByType("navigation")[0];
  results.protocol = navigation ? navigation.nextHopProtocol : "";
  document.getElementById("protocol").textContent = results.protocol || "?";
  document.getElementById("where").textContent = location.pathname.replace(/(\/_token\/[^/]{8})[^/]*/, "$1…");
  const checks = [["fetch", checkFetch], ["EventSource", checkEventSource], ["WebSocket", checkWebSocket]];
  for (const [name, check] of checks) {
    try {
      report(name, true, await withDeadline(name, check()));
    } catch (error) {
      report(name, false, `FAILED: ${error.message}`);
    }
  }
  const passed = Object.values(results.checks).filter((check) => check.ok).length;
  document.getElementById("summary").textContent = `${passed} of ${checks.length} checks passed`;
  results.done = true;
}

main();
