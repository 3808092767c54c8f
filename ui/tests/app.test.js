// The real app under Xvfb, driven through WebKitWebDriver (via tauri-driver), with its embedded
// node on loopback beside a real tracker. Needs NEUROSHARD_BIN (the CLI) and NEUROSHARD_APP
// (the desktop binary); scripts/test-app.sh sets them and starts Xvfb and tauri-driver.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdir, writeFile } from "node:fs/promises";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { Builder, By, until } from "selenium-webdriver";

const here = dirname(fileURLToPath(import.meta.url));
const shots = join(here, "..", "test-results");
const bin = process.env.NEUROSHARD_BIN;
const driverUrl = process.env.TAURI_DRIVER_URL ?? "http://127.0.0.1:4444/";
const WAIT = 60_000;

let tracker;
let trackerUrl;
let driver;

/** Resolves with the first match of `pattern` in the child's stderr. */
function awaitLine(child, pattern) {
  return new Promise((resolve, reject) => {
    let seen = "";
    child.stderr.on("data", (chunk) => {
      seen += chunk;
      const m = seen.match(pattern);
      if (m) resolve(m);
    });
    child.on("exit", (code) => reject(new Error(`exited ${code} before ${pattern}: ${seen}`)));
  });
}

const text = (css) => driver.executeScript("return document.querySelector(arguments[0])?.textContent ?? null", css);
const waitText = (css, predicate, what) =>
  driver.wait(async () => predicate(await text(css)), WAIT, `${css}: ${what}`);

async function shot(name) {
  await writeFile(join(shots, name), await driver.takeScreenshot(), "base64");
}

function trackerStats() {
  return JSON.parse(execFileSync(bin, ["status", "--tracker", trackerUrl], { encoding: "utf8" }));
}

before(async () => {
  assert.ok(bin && process.env.NEUROSHARD_APP, "NEUROSHARD_BIN and NEUROSHARD_APP are set");
  await mkdir(shots, { recursive: true });
  // The app's paths come from the environment tauri-driver passes down (scripts/test-app.sh).
  const config = process.env.NEUROSHARD_CONFIG;
  const model = process.env.NEUROSHARD_MODEL_DIR;
  assert.ok(config && model, "NEUROSHARD_CONFIG and NEUROSHARD_MODEL_DIR are set");
  execFileSync(bin, ["init-model", model]);
  tracker = spawn(bin, ["tracker", "--listen", "127.0.0.1:0"], { stdio: ["ignore", "ignore", "pipe"] });
  const [, addr] = await awaitLine(tracker, /tracker listening on ([0-9.:]+)/);
  trackerUrl = `http://${addr}`;
  await mkdir(config, { recursive: true });
  await writeFile(
    join(config, "settings.json"),
    JSON.stringify({ version: 1, profile: { display_name: "CI", onboarded: true }, compute: { gpu_share_percent: 100 }, network: { tracker: trackerUrl } }),
  );
  driver = await new Builder()
    .usingServer(driverUrl)
    .withCapabilities({
      browserName: "wry",
      "tauri:options": { application: process.env.NEUROSHARD_APP },
    })
    .build();
});

after(async () => {
  await driver?.quit().catch(() => {});
  tracker?.kill();
});

test("the dashboard shows the embedded node's live state and the receipts it earns", async () => {
  await driver.wait(until.elementLocated(By.css("body[data-ready='true']")), WAIT);
  await waitText("#state-pill", (t) => t === "Serving", "the node serves");
  assert.equal(await text("#stat-layers"), "0–5", "Auto serves the whole demo model");
  assert.match(await text("#state-detail"), /^at 127\.0\.0\.1:\d+$/);
  assert.equal(trackerStats().nodes, 1, "the app's node registered with the tracker");
  execFileSync(bin, ["generate", "--tracker", trackerUrl, "--model", process.env.NEUROSHARD_MODEL_DIR, "--prompt", "hello app", "--max-new-tokens", "8", "--json"]);
  await waitText("#stat-receipts", (t) => Number(t) >= 8, "a verified receipt per generated token");
  await shot("app-dashboard.png");
  await driver.findElement(By.css('.nav[data-screen="receipts"]')).click();
  await waitText("#receipt-count", (t) => /^\d+ receipts$/.test(t) && parseInt(t, 10) >= 8, "the receipts table lists them");
  await shot("app-receipts.png");
});

test("a settings change reaches the node", async () => {
  await driver.findElement(By.css('.nav[data-screen="settings"]')).click();
  await driver.findElement(By.css('input[name="layer-mode"][value="range"]')).click();
  const start = await driver.findElement(By.id("f-layer-start"));
  await start.clear();
  await start.sendKeys("0");
  const end = await driver.findElement(By.id("f-layer-end"));
  await end.clear();
  await end.sendKeys("3");
  await waitText("#layer-estimate", (t) => t.startsWith("Serves layers 0–2 of 6"), "the estimate before applying");
  await driver.findElement(By.css("#settings-form button[type=submit]")).click();
  await waitText("#settings-message", (t) => t.startsWith("Saved"), "saved");
  await shot("app-settings.png");
  await driver.findElement(By.css('.nav[data-screen="dashboard"]')).click();
  await waitText("#stat-layers", (t) => t === "0–2", "the node restarted on layers 0..3");
  await waitText("#state-pill", (t) => t === "Serving", "and serves again");
  await driver.wait(() => trackerStats().layers_covered && Object.values(trackerStats().layers_covered)[0] === 3, WAIT, "the tracker sees the new range");
  const stats = trackerStats();
  assert.equal(stats.nodes, 1);
  assert.equal(stats.clone_warnings ?? 0, 0, "a restart is not a copied identity");
});
