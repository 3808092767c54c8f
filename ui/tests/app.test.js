// The real app under Xvfb, driven through WebKitWebDriver (via tauri-driver), with its embedded
// node on loopback beside a real tracker. Needs NEUROSHARD_BIN (the CLI) and NEUROSHARD_APP
// (the desktop binary); scripts/test-app.sh sets them and starts Xvfb and tauri-driver.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { cp, mkdir, writeFile } from "node:fs/promises";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { By, until } from "selenium-webdriver";
import { awaitLine, startTracker } from "./processes.js";
import { WAIT, openApp, page, chatMatchesGenerate, trackerStats as statsOf } from "./webdriver.js";

const here = dirname(fileURLToPath(import.meta.url));
const shots = join(here, "..", "test-results");
const bin = process.env.NEUROSHARD_BIN;

let tracker;
let trackerUrl;
let peer;
let driver;
let text, waitText, shot, nav;

const trackerStats = () => statsOf(bin, trackerUrl);

before(async () => {
  assert.ok(bin && process.env.NEUROSHARD_APP, "NEUROSHARD_BIN and NEUROSHARD_APP are set");
  await mkdir(shots, { recursive: true });
  // The app's paths come from the environment tauri-driver passes down (scripts/test-app.sh).
  const config = process.env.NEUROSHARD_CONFIG;
  const model = process.env.NEUROSHARD_MODEL_DIR;
  assert.ok(config && model, "NEUROSHARD_CONFIG and NEUROSHARD_MODEL_DIR are set");
  // The shipped trained demo model, so the chat shows the text it learned.
  await cp(join(here, "..", "..", "models", "demo"), model, { recursive: true });
  ({ child: tracker, url: trackerUrl } = await startTracker(bin));
  await mkdir(config, { recursive: true });
  await writeFile(
    join(config, "settings.json"),
    JSON.stringify({ version: 1, profile: { display_name: "CI", onboarded: true }, compute: { gpu_share_percent: 100 }, network: { tracker: trackerUrl } }),
  );
  driver = await openApp(process.env.NEUROSHARD_APP);
  ({ text, waitText, shot, nav } = page(driver, shots));
});

after(async () => {
  await driver?.quit().catch(() => {});
  tracker?.kill();
  peer?.kill();
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
  await nav("receipts");
  await waitText("#receipt-count", (t) => /^\d+ receipts$/.test(t) && parseInt(t, 10) >= 8, "the receipts table lists them");
  await shot("app-receipts.png");
});

test("the chat page streams an answer from the app's swarm, the same as generate", async () => {
  await chatMatchesGenerate(driver, { bin, trackerUrl, model: process.env.NEUROSHARD_MODEL_DIR });
  await shot("app-chat.png");
});

test("a settings change reaches the node", async () => {
  await nav("settings");
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
  await nav("dashboard");
  await waitText("#stat-layers", (t) => t === "0–2", "the node restarted on layers 0..3");
  await waitText("#state-pill", (t) => t === "Serving", "and serves again");
  await driver.wait(() => trackerStats().layers_covered && Object.values(trackerStats().layers_covered)[0] === 3, WAIT, "the tracker sees the new range");
  const stats = trackerStats();
  assert.equal(stats.nodes, 1);
  assert.equal(stats.clone_warnings ?? 0, 0, "a restart is not a copied identity");
});

test("picking a swarm model fetches its layers from a peer with progress, then serves it", async () => {
  // A peer serving another model, which the app has never seen.
  const other = join(process.env.NEUROSHARD_CONFIG, "..", "other-model");
  execFileSync(bin, ["init-model", other, "--size", "demo"]);
  peer = spawn(bin, ["node", "--model", other, "--layers", "0..6", "--tracker", trackerUrl, "--host", "127.0.0.1", "--no-lan", "--data-dir", join(other, "..", "peer-data")], { stdio: ["ignore", "ignore", "pipe"] });
  const [, otherId] = await awaitLine(peer, /model ([0-9a-f]{16})/);
  await nav("settings");
  await driver.findElement(By.css('input[name="model-source"][value="swarm"]')).click();
  const row = By.css(`#model-rows tr[data-model="${otherId}"]`);
  await driver.wait(async () => {
    const found = await driver.findElements(row);
    if (!found.length) await driver.findElement(By.id("models-refresh")).click();
    return found.length > 0;
  }, WAIT, "the swarm's model is listed");
  assert.match(await text(`#model-rows tr[data-model="${otherId}"]`), /llama · 1\dM parameters · 6 layers/);
  await driver.executeScript(`
    window.__fetching = [];
    new MutationObserver(() => window.__fetching.push(document.querySelector("#model-fetch-text").textContent))
      .observe(document.querySelector("#model-fetch-text"), { subtree: true, childList: true, characterData: true });
  `);
  await driver.findElement(By.css(`#model-rows tr[data-model="${otherId}"] input`)).click();
  await driver.findElement(By.css("#settings-form button[type=submit]")).click();
  await waitText("#settings-message", (t) => t.startsWith("Saved"), "saved");
  await nav("dashboard");
  await waitText("#stat-model", (t) => t.includes(otherId), "the node serves the swarm's model");
  await waitText("#state-pill", (t) => t === "Serving", "and serves");
  assert.equal(await text("#stat-layers"), "0–2", "the layers chosen before");
  const fetching = await driver.executeScript("return window.__fetching");
  assert.ok(fetching.some((t) => /^Fetching layers 0–2 of model/.test(t)), `progress shown: ${JSON.stringify(fetching)}`);
  await driver.wait(() => trackerStats().nodes === 2 && Object.keys(trackerStats().layers_covered).join() === otherId, WAIT, "both nodes serve the swarm's model");
  await shot("app-model.png");
});
