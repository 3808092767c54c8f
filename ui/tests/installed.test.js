// The installed package, started as its menu entry starts it, by a volunteer who has never run
// it: first run, the dashboard serving, the tray through D-Bus as a desktop's tray host sees it,
// a tracker set on the settings page, receipts earned, the chat, and Quit from the tray.
// scripts/test-installed.sh installs the .deb in a throwaway root and sets NEUROSHARD_APP and
// NEUROSHARD_APP_ARGS (the menu entry's Exec line), NEUROSHARD_BIN (the CLI), NEUROSHARD_MODEL
// (the shipped demo model, for the CLI's tokenizer), TRAY_HOST and NEUROSHARD_SHOTS.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdir } from "node:fs/promises";
import { By, until } from "selenium-webdriver";
import { awaitLine, startTracker } from "./processes.js";
import { WAIT, openApp, page, chatMatchesGenerate, trackerStats } from "./webdriver.js";

const { NEUROSHARD_APP: app, NEUROSHARD_BIN: bin, NEUROSHARD_MODEL: model, TRAY_HOST: host, NEUROSHARD_SHOTS: shots } = process.env;
const args = JSON.parse(process.env.NEUROSHARD_APP_ARGS ?? "[]");

let tracker;
let trackerUrl;
let tray;
let registered;
let driver;
let text, waitText, shot, nav;

/** `promise`, or a failure naming `what` after WAIT. */
const within = (promise, what) => {
  let timer;
  const late = new Promise((_, reject) => (timer = setTimeout(() => reject(new Error(`no ${what} within ${WAIT} ms`)), WAIT)));
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
};
/** The app's tray item on the session bus: [line, bus name, object path]. */
const item = () => within(registered, "tray item registered with the desktop's tray");

/** The tray host's view of the app's exported menu. */
const trayMenu = async () => {
  const [, name, path] = await item();
  return JSON.parse(execFileSync("/usr/bin/python3", [host, "menu", name, path], { encoding: "utf8", timeout: WAIT }));
};
const trayClick = async (label) => {
  const [, name, path] = await item();
  execFileSync("/usr/bin/python3", [host, "click", name, path, label], { timeout: WAIT });
};
const labels = (entries) => entries.filter((e) => e.type !== "separator").map((e) => e.label);

before(async () => {
  assert.ok(app && bin && model && host && shots, "set by scripts/test-installed.sh");
  await mkdir(shots, { recursive: true });
  // The desktop's tray, on the session bus before the app starts, as on a desktop.
  tray = spawn("/usr/bin/python3", [host, "serve"], { stdio: ["ignore", "ignore", "pipe"] });
  registered = awaitLine(tray, /^registered (\S+) (\S+)$/m);
  registered.catch(() => {});
  await within(awaitLine(tray, /^watching$/m), "tray host on the session bus");
  ({ child: tracker, url: trackerUrl } = await startTracker(bin));
  driver = await openApp(app, args);
  ({ text, waitText, shot, nav } = page(driver, shots));
});

after(async () => {
  await driver?.quit().catch(() => {});
  tracker?.kill();
  tray?.kill();
});

test("the first run asks how much to lend, then the dashboard shows the node serving", async () => {
  await driver.wait(until.elementLocated(By.css("body[data-ready='true']")), WAIT);
  await driver.wait(until.elementIsVisible(driver.findElement(By.id("first-run"))), WAIT, "the first-run dialog opens");
  await waitText("#state-pill", (t) => t === "Set-up needed", "nothing is lent before the first run");
  await shot("installed-first-run.png");
  await driver.findElement(By.id("fr-name")).sendKeys("Volunteer");
  await driver.findElement(By.css('input[name="preset"][value="light"]')).click();
  await driver.findElement(By.css("#first-run-form button[type=submit]")).click();
  await waitText("#state-pill", (t) => t === "Serving", "the node serves");
  assert.equal(await text("#stat-layers"), "0–5", "Auto serves the whole demo model");
  assert.match(await text("#state-detail"), /^at \S+:7420$/, "on the default port");
  await shot("installed-dashboard.png");
});

test("the tray's menu is exported over D-Bus and pauses and resumes the node", async () => {
  // The tray follows the status a moment after the page does.
  await driver.wait(async () => /^Serving layers 0–5 · /.test((await trayMenu())[0].label), WAIT, "the tray's status line");
  const menu = await trayMenu();
  assert.deepEqual(labels(menu).slice(1), ["Pause now", "Finish current requests, then pause", "Snooze", "Open dashboard", "Settings…", "Receipts", "Quit NeuroShard"]);
  assert.equal(menu[0].enabled, false);
  assert.deepEqual(labels(menu.find((e) => e.label === "Snooze").children), ["For 1 hour", "For 3 hours", "Until tomorrow"]);
  await trayClick("Pause now");
  await waitText("#state-pill", (t) => t === "Paused", "the tray paused the node");
  await driver.wait(async () => labels(await trayMenu()).includes("Resume"), WAIT, "the tray offers to resume");
  await trayClick("Resume");
  await waitText("#state-pill", (t) => t === "Serving", "the tray resumed the node");
});

test("a tracker set on the settings page takes the node into the swarm, where it earns receipts", async () => {
  await nav("settings");
  const field = await driver.findElement(By.id("f-tracker"));
  await field.clear();
  await field.sendKeys(trackerUrl);
  await driver.findElement(By.css("#settings-form button[type=submit]")).click();
  await waitText("#settings-message", (t) => t.startsWith("Saved"), "saved");
  await shot("installed-settings.png");
  await driver.wait(() => trackerStats(bin, trackerUrl).nodes === 1, WAIT, "the node registered with the tracker");
  execFileSync(bin, ["generate", "--tracker", trackerUrl, "--model", model, "--prompt", "hello volunteer", "--max-new-tokens", "8", "--json"], { timeout: WAIT });
  await nav("dashboard");
  await waitText("#stat-receipts", (t) => Number(t) >= 8, "a verified receipt per generated token");
  await nav("receipts");
  await waitText("#receipt-count", (t) => /^\d+ receipts$/.test(t) && parseInt(t, 10) >= 8, "the receipts table lists them");
  await shot("installed-receipts.png");
});

test("the chat page answers through the swarm", async () => {
  await chatMatchesGenerate(driver, { bin, trackerUrl, model });
  await shot("installed-chat.png");
});

test("Quit in the tray ends the app", async () => {
  const [, name] = await item();
  const gone = awaitLine(tray, new RegExp(`^gone ${name.replace(/\./g, "\\.")}$`, "m"));
  await trayClick("Quit NeuroShard");
  await within(gone, "exit of the app's bus connection");
});
