// Loaded from /static/app.js by absolute path; checks what else the page got by absolute path
// and calls the app's /api/ the same way. window.results is read back by the test.
"use strict";

const results = { checks: {}, done: false };
window.results = results;

function report(name, ok, detail) {
  results.checks[name] = { ok, detail };
  const item = document.createElement("li");
  item.className = ok ? "ok" : "failed";
  item.textContent = `${name}: ${detail}`;
  document.getElementById("checks").append(item);
}

async function check(name, run) {
  try {
    report(name, true, await run());
  } catch (error) {
    report(name, false, `FAILED: ${error.message}`);
  }
}

function imageLoaded(image) {
  if (image.complete) {
    return image.naturalWidth > 0 ? Promise.resolve() : Promise.reject(new Error("broken"));
  }
  return new Promise((resolve, reject) => {
    image.onload = resolve;
    image.onerror = () => reject(new Error("the image did not load"));
  });
}

async function main() {
  results.host = location.host;
  await check("stylesheet", async () => {
    const color = getComputedStyle(document.getElementById("styled")).color;
    if (color !== "rgb(0, 128, 0)") throw new Error(`color ${color}`);
    return "/static/style.css applied";
  });
  await check("image", async () => {
    await imageLoaded(document.getElementById("logo"));
    return "/static/logo.svg loaded";
  });
  await check("api", async () => {
    const response = await fetch("/api/info?from=page");
    const seen = await response.json();
    if (response.status !== 200 || seen.path !== "/api/info?from=page") {
      throw new Error(`status ${response.status}, the app saw ${seen.path}`);
    }
    results.api_headers = seen.headers;
    return "GET /api/info reached the app with its path unchanged";
  });
  await check("api POST", async () => {
    const response = await fetch("/api/echo", { method: "POST", body: "from the page" });
    const seen = await response.json();
    if (seen.body !== "from the page") throw new Error(`the app read ${JSON.stringify(seen.body)}`);
    return "POST /api/echo carried its body";
  });
  const passed = Object.values(results.checks).filter((c) => c.ok).length;
  document.getElementById("summary").textContent = `${passed} of 4 checks passed`;
  results.done = true;
}

main();
