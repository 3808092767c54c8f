// The front end in headless Chromium (Debian's, driven by playwright-core), with the app behind
// window.__TAURI__ mocked. Screenshots go to ui/test-results/.
import { test, before, after, beforeEach, afterEach } from "node:test";
import assert from "node:assert/strict";
import { readFile, mkdir, mkdtemp, cp, writeFile, rm } from "node:fs/promises";
import { join, dirname } from "node:path";
import { tmpdir } from "node:os";
import { spawn, execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { serve } from "./serve.js";
import { awaitLine, startTracker } from "./processes.js";
import { installMock } from "./mock-ipc.js";

const here = dirname(fileURLToPath(import.meta.url));
const shots = join(here, "..", "test-results");
const fixture = async (name) => JSON.parse(await readFile(join(here, "fixtures", name), "utf8"));

let browser;
let server;
let page;
let problems;

const DAY = 24 * 3600 * 1000;
const NOW = Date.now();

function receiptsSeed(n) {
  const statuses = ["verified", "verified", "verified", "pending", "voided"];
  return Array.from({ length: n }, (_, i) => ({
    id: `r${String(i).padStart(3, "0")}`.padEnd(64, "0"),
    kind: "forward",
    model_id: "9e2f4a61c0b3d875",
    layer_start: 2,
    layer_end: 6,
    session_id: `s${i}`,
    start_pos: i * 4,
    tokens: 10 + i,
    flops: 1000,
    requester: "ab".repeat(32),
    created_ms: NOW - i * 600_000,
    status: statuses[i % statuses.length],
    spot_checked: i % 7 === 0,
    reliability: 0.9,
    credit: statuses[i % statuses.length] === "verified" ? 0.01 * (i + 1) : 0,
    settled_ms: NOW,
    evidence: statuses[i % statuses.length] === "voided" ? "the receipt's fingerprint: 14 of 16 entries differ" : null,
    vouched: i !== 1,
  }));
}

async function seed({ onboarded = true } = {}) {
  const settings = await fixture("default-settings.json");
  settings.profile.onboarded = onboarded;
  if (onboarded) settings.profile.display_name = "Ada";
  const status = await fixture("serving-status.json");
  if (!onboarded) status.state = "setup";
  const t = (receipts, tokens, credit, unvouched = 0) => ({ receipts, tokens, flops: tokens * 1000, credit, unvouched });
  const hours = Array.from({ length: 24 }, (_, i) => ({ start_ms: NOW - (23 - i) * 3600_000, tokens: (i * 37) % 200, credit: ((i * 13) % 9) / 100 }));
  const days = Array.from({ length: 7 }, (_, i) => ({ start_ms: NOW - (6 - i) * DAY, tokens: 1000 + i * 300, credit: 0.2 + i * 0.05 }));
  return {
    settings,
    status,
    receipts: receiptsSeed(60),
    totals: { today: t(42, 1800, 0.84), week: t(310, 14000, 6.2), lifetime: t(1290, 61000, 25.5, 1.5) },
    series: { "24h": hours, "7d": days },
  };
}

async function open(options) {
  const data = await seed(options);
  await page.addInitScript(installMock, data);
  await page.goto(server.url);
  await page.waitForSelector("body[data-ready='true']");
}

const calls = (command) => page.evaluate((c) => window.__mock.calls.filter((x) => x.command === c).map((x) => x.args), command);

before(async () => {
  await mkdir(shots, { recursive: true });
  server = await serve();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  await browser?.close();
  server?.close();
});

beforeEach(async () => {
  page = await browser.newPage({ viewport: { width: 1180, height: 860 } });
  problems = [];
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(m.text());
  });
  page.on("pageerror", (e) => problems.push(e.message));
});

afterEach(async () => {
  await page.close();
  assert.deepEqual(problems, [], "no script errors or CSP violations");
});

test("first run: nothing is lent until a name (or anonymity) and a preset are chosen", async () => {
  await open({ onboarded: false });
  const overlay = page.locator("#first-run");
  assert.equal(await overlay.isVisible(), true);
  await page.screenshot({ path: join(shots, "first-run.png") });
  await page.click("#first-run-form button[type=submit]");
  const nameError = page.locator('#first-run-form [data-field="profile.display_name"] .field-error');
  assert.match(await nameError.textContent(), /display name/);
  assert.deepEqual(await calls("finish_first_run"), [], "refused in the page, nothing sent");
  await page.fill("#fr-name", "Ada");
  await page.check('input[name="preset"][value="light"]');
  await page.click("#first-run-form button[type=submit]");
  await overlay.waitFor({ state: "hidden" });
  assert.deepEqual(await calls("finish_first_run"), [{ displayName: "Ada", anonymous: false, preset: "light" }]);
  assert.equal(await page.textContent("#state-pill"), "Serving");
});

test("first run: anonymous needs no name", async () => {
  await open({ onboarded: false });
  await page.check("#fr-anon");
  assert.equal(await page.isDisabled("#fr-name"), true);
  await page.click("#first-run-form button[type=submit]");
  await page.locator("#first-run").waitFor({ state: "hidden" });
  assert.deepEqual(await calls("finish_first_run"), [{ displayName: null, anonymous: true, preset: "medium" }]);
});

test("the pause toggle follows the state both ways", async () => {
  await open();
  const toggle = page.locator("#toggle-pause");
  assert.equal(await toggle.textContent(), "Pause now");
  await toggle.click();
  await page.waitForFunction(() => document.querySelector("#toggle-pause").textContent === "Resume");
  assert.equal(await page.textContent("#state-pill"), "Paused");
  assert.equal(await page.isDisabled("#drain"), true, "nothing to finish while paused");
  await toggle.click();
  await page.waitForFunction(() => document.querySelector("#toggle-pause").textContent === "Pause now");
  assert.deepEqual(await calls("set_paused"), [{ paused: true }, { paused: false }]);
  await page.click("#drain");
  await page.waitForFunction(() => document.querySelector("#state-pill").textContent === "Finishing requests");
  assert.equal(await toggle.textContent(), "Resume");
});

test("a refused setting shows its message beside its field, and nothing is stored", async () => {
  await open();
  await page.click('.nav[data-screen="settings"]');
  await page.fill("#f-up", "99999999");
  await page.click("#settings-form button[type=submit]");
  const field = page.locator('[data-field="bandwidth.upload_kbps"]');
  await page.waitForFunction(() => document.querySelector('[data-field="bandwidth.upload_kbps"]').classList.contains("invalid"));
  assert.match(await field.locator(".field-error").textContent(), /0 to 10000000/);
  assert.match(await page.textContent("#settings-message"), /Not saved/);
  assert.equal(await page.evaluate(() => window.__mock.state.settings.bandwidth.upload_kbps), 0);
  await page.screenshot({ path: join(shots, "settings-error.png"), fullPage: true });
  await page.fill("#f-up", "512");
  await page.click("#settings-form button[type=submit]");
  await page.waitForFunction(() => document.querySelector("#settings-message").classList.contains("ok"));
  assert.equal(await field.locator(".field-error").textContent(), "");
  assert.equal(await page.evaluate(() => window.__mock.state.settings.bandwidth.upload_kbps), 512);
  const [, saved] = await calls("update_settings");
  assert.equal(saved.patch.bandwidth.upload_kbps, 512);
});

test("temperature limits and the programs that hold the node: picked, suggested, refused by field", async () => {
  await open();
  assert.equal(await page.textContent("#stat-temps"), "CPU 61 °C · GPU temperature unreadable here");
  await page.click('.nav[data-screen="settings"]');
  await page.waitForSelector('#f-running option[value="Game.exe"]', { state: "attached" });
  assert.equal(await page.getAttribute("#f-cpu-limit", "placeholder"), "75 light · 85 medium · 95 full");
  await page.selectOption("#f-running", "Game.exe");
  await page.click("#add-launchers");
  await page.click("#add-launchers");
  assert.equal(await page.inputValue("#f-programs"), "Game.exe\nsteam\ngamescope\nlutris");
  await page.fill("#f-gpu-limit", "80");
  await page.fill("#f-cpu-limit", "20");
  await page.click("#settings-form button[type=submit]");
  await page.waitForSelector('[data-field="thermal.cpu_limit_c"].invalid');
  assert.match(await page.textContent('[data-field="thermal.cpu_limit_c"] .field-error'), /40 to 105/);
  assert.equal(await page.evaluate(() => window.__mock.state.settings.thermal.cpu_limit_c), null);
  await page.fill("#f-cpu-limit", "");
  await page.check("#f-fullscreen");
  await page.uncheck("#f-note-reach");
  await page.fill("#f-disk-cap", "4096");
  await page.click("#settings-form button[type=submit]");
  await page.waitForFunction(() => document.querySelector("#settings-message").classList.contains("ok"));
  const saved = await page.evaluate(() => window.__mock.state.settings);
  assert.deepEqual(saved.thermal, { cpu_limit_c: null, gpu_limit_c: 80, min_hold_secs: 120 });
  assert.deepEqual(saved.gaming, { programs: ["Game.exe", "steam", "gamescope", "lutris"], hold_when_fullscreen: true });
  assert.deepEqual(saved.notifications, { temperature: true, layers_fetched: true, first_receipt: true, reachability: false });
  assert.deepEqual(saved.storage, { cap_mib: 4096 });
  await page.waitForFunction(() => document.querySelector("#disk-usage").textContent.includes("of 4.3 GB"));
  assert.equal(await page.textContent("#disk-usage"), "Using 1.5 GB of 4.3 GB: 1 fetched model and the receipts.");
  // A GPU limit with no GPU sensor to read says it holds nothing.
  await page.evaluate(() => window.__mock.emit("status", window.__mock.state.status));
  assert.match(await page.textContent("#thermal-now"), /No GPU sensor can be read here/);
  await page.screenshot({ path: join(shots, "settings-thermal.png"), fullPage: true });
});

test("the layer estimate shows before applying, and a range past the model is flagged", async () => {
  await open();
  await page.click('.nav[data-screen="settings"]');
  await page.waitForFunction(() => document.querySelector("#layer-estimate").textContent.includes("110 MB"));
  await page.check('input[name="layer-mode"][value="range"]');
  await page.fill("#f-layer-start", "2");
  await page.fill("#f-layer-end", "9");
  await page.waitForFunction(() => document.querySelector('[data-field="layers"]').classList.contains("invalid"));
  assert.match(await page.textContent('[data-field="layers"] .field-error'), /past the model/);
  await page.screenshot({ path: join(shots, "settings.png"), fullPage: true });
});

test("receipts page through, filter, and export", async () => {
  await open();
  await page.click('.nav[data-screen="receipts"]');
  await page.waitForFunction(() => document.querySelectorAll("#receipt-rows tr").length === 25);
  assert.equal(await page.textContent("#page-label"), "Page 1 of 3");
  assert.equal(await page.isDisabled("#page-prev"), true);
  assert.match(await page.textContent("#total-life-sub"), /1,290 receipts/);
  assert.match(await page.textContent("#total-life-sub"), /unvouched, not counted/);
  assert.doesNotMatch(await page.textContent("#total-week-sub"), /unvouched/);
  // A receipt of a requester no trusted issuer vouches for shows no credit; a void its evidence.
  assert.equal(await page.textContent("#receipt-rows tr:nth-child(2) td:nth-child(4)"), "unvouched");
  assert.match(await page.getAttribute("#receipt-rows tr:nth-child(5)", "title"), /voided: the receipt's fingerprint/);
  const first = await page.textContent("#receipt-rows tr:first-child td:nth-child(3)");
  await page.click("#page-next");
  await page.waitForFunction(() => document.querySelector("#page-label").textContent === "Page 2 of 3");
  assert.notEqual(await page.textContent("#receipt-rows tr:first-child td:nth-child(3)"), first);
  await page.click("#page-next");
  await page.waitForFunction(() => document.querySelectorAll("#receipt-rows tr").length === 10);
  assert.equal(await page.isDisabled("#page-next"), true);
  await page.selectOption("#receipt-filter", "voided");
  await page.waitForFunction(() => document.querySelector("#receipt-count").textContent === "12 receipts");
  assert.equal(await page.textContent("#page-label"), "Page 1 of 1");
  const badges = await page.locator("#receipt-rows .badge").allTextContents();
  assert.ok(badges.length === 12 && badges.every((b) => b === "voided"));
  await page.selectOption("#receipt-filter", "");
  await page.click("#export");
  await page.waitForFunction(() => document.querySelector("#export-message").textContent.includes(".csv"));
  assert.equal((await calls("export_receipts")).length, 1);
  await page.screenshot({ path: join(shots, "receipts.png"), fullPage: true });
});

test("the dashboard follows status events", async () => {
  await open();
  assert.equal(await page.textContent("#stat-layers"), "2–5");
  assert.equal(await page.textContent("#stat-device"), "tokens per second on the CPU");
  assert.match(await page.textContent("#stat-device-note"), /CPU only/);
  await page.evaluate(() =>
    window.__mock.emit("status", {
      ...window.__mock.state.status,
      device: "gpu",
      device_note: null,
      tokens_per_s: 7.25,
      layers: { start: 0, end: 3 },
      sessions: 4,
      receipts_today: 43,
      bandwidth: { ...window.__mock.state.status.bandwidth, up_bps: 1048576, up_cap_kbps: 1024 },
      reachability: "relayed",
      reachability_advice: "Peers reach this node through the relay at 11.77.0.11:7101, an extra hop.",
    }),
  );
  await page.waitForFunction(() => document.querySelector("#stat-tps").textContent === "7.3");
  assert.equal(await page.textContent("#stat-reach"), "reachability: relayed");
  assert.match(await page.getAttribute("#stat-reach", "title"), /through the relay/);
  assert.equal(await page.textContent("#stat-layers"), "0–2");
  assert.equal(await page.textContent("#stat-sessions"), "4");
  assert.equal(await page.textContent("#stat-receipts"), "43");
  assert.equal(await page.textContent("#stat-device"), "tokens per second on the GPU");
  assert.equal(await page.textContent("#stat-device-note"), "");
  const width = await page.evaluate(() => document.querySelector("#meter-up").style.width);
  assert.equal(width, "100%", "1 MiB/s against a 1024 KB/s cap fills the meter");
  await page.evaluate(() => window.__mock.emit("status", { ...window.__mock.state.status, state: "error", detail: "port 7420 is taken" }));
  await page.waitForFunction(() => document.querySelector("#state-pill").textContent === "Error");
  assert.equal(await page.textContent("#state-detail"), "port 7420 is taken");
  await page.evaluate(() => window.__mock.emit("status", window.__mock.state.status));
  await page.waitForSelector("#chart svg rect.bar", { state: "attached" });
  assert.equal(await page.locator("#chart rect.bar").count(), 24);
  await page.click('[data-range="7d"]');
  await page.waitForFunction(() => document.querySelectorAll("#chart rect.bar").length === 7);
  await page.click('[data-range="24h"]');
  await page.waitForFunction(() => document.querySelectorAll("#chart rect.bar").length === 24);
  await page.screenshot({ path: join(shots, "dashboard.png"), fullPage: true });
});

test("the navigate event from the tray opens a screen", async () => {
  await open();
  await page.evaluate(() => window.__mock.emit("navigate", "receipts"));
  await page.waitForSelector("#screen-receipts:not([hidden])");
  assert.equal(await page.getAttribute('.nav[data-screen="receipts"]', "aria-current"), "page");
});

const MODELS = [
  {
    id: "4c1d9e0b7a2f6385",
    total_layers: 24,
    coverage: [3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 0, 0],
    providers: 9,
    complete: false,
    about: { family: "qwen2", parameters: 494_032_768, hidden_size: 896, context: 32768 },
  },
  {
    id: "9e2f4a61c0b3d875",
    total_layers: 6,
    coverage: [1, 1, 1, 1, 1, 1],
    providers: 2,
    complete: true,
    about: { family: "llama", parameters: 4_600_000, hidden_size: 256, context: 512 },
  },
];

async function openWith(extra) {
  const data = { ...(await seed()), ...extra };
  await page.addInitScript(installMock, data);
  await page.goto(server.url);
  await page.waitForSelector("body[data-ready='true']");
}

test("the model choice lists the swarm's models with their coverage and shows the fetch's progress", async () => {
  await openWith({ models: MODELS });
  await page.click('.nav[data-screen="settings"]');
  assert.equal(await page.isVisible("#model-swarm"), false, "the demo model is the default");
  await page.check('input[name="model-source"][value="swarm"]');
  await page.waitForSelector('#model-rows tr[data-model="4c1d9e0b7a2f6385"]');
  const row = page.locator('#model-rows tr[data-model="4c1d9e0b7a2f6385"]');
  assert.match(await row.textContent(), /qwen2 · 494M parameters · 24 layers/);
  assert.equal(await row.locator(".cov").count(), 24);
  assert.equal(await row.locator('.cov[data-n="0"]').count(), 2, "the uncovered layers show");
  assert.match(await row.locator(".coverage").getAttribute("aria-label"), /2 of 24 layers have no provider/);
  // Saving with no model picked is refused in the page.
  await page.click("#settings-form button[type=submit]");
  await page.waitForFunction(() => document.querySelector('[data-field="model"]').classList.contains("invalid"));
  assert.deepEqual(await calls("update_settings"), []);
  await row.locator('input[name="swarm-model"]').check();
  await page.check("#f-api-on");
  await page.fill("#f-api-port", "8011");
  await page.click("#settings-form button[type=submit]");
  await page.waitForFunction(() => document.querySelector("#settings-message").classList.contains("ok"));
  const [saved] = await calls("update_settings");
  assert.deepEqual(saved.patch.model, { source: "swarm", id: "4c1d9e0b7a2f6385" });
  assert.deepEqual(saved.patch.api, { enabled: true, port: 8011 });
  // The app fetches the layers: the progress shows here and on the dashboard.
  await page.evaluate(() =>
    window.__mock.emit("status", {
      ...window.__mock.state.status,
      fetch: { model_id: "4c1d9e0b7a2f6385", layers: { start: 12, end: 18 }, done_bytes: 40_000_000, total_bytes: 100_000_000 },
      api_url: "http://127.0.0.1:8011/v1",
    }),
  );
  await page.waitForSelector("#model-fetch:not([hidden])");
  assert.equal(await page.textContent("#model-fetch-text"), "Fetching layers 12–17 of model 4c1d9e0b: 40% (40.0 MB of 100 MB)");
  assert.equal(await page.evaluate(() => document.querySelector("#model-fetch-fill").style.width), "40%");
  assert.match(await page.textContent("#api-state"), /Serving at http:\/\/127\.0\.0\.1:8011\/v1/);
  await page.screenshot({ path: join(shots, "settings-model.png"), fullPage: true });
  await page.click('.nav[data-screen="dashboard"]');
  assert.match(await page.textContent("#stat-fetch"), /Fetching layers 12–17/);
  await page.evaluate(() => window.__mock.emit("status", { ...window.__mock.state.status, fetch: null }));
  await page.waitForFunction(() => document.querySelector("#stat-fetch").textContent === "");
  // A local folder the app refuses is named beside its field.
  await page.click('.nav[data-screen="settings"]');
  await page.check('input[name="model-source"][value="local"]');
  await page.evaluate(() => {
    const invoke = window.__TAURI__.core.invoke;
    window.__TAURI__.core.invoke = (command, args) =>
      command === "update_settings" && args.patch.model.source === "local"
        ? Promise.reject({ code: "invalid_setting", field: "model.dir", message: "/nowhere is not a model this app can serve" })
        : invoke(command, args);
  });
  await page.fill("#f-model-dir", "/nowhere");
  await page.click("#settings-form button[type=submit]");
  await page.waitForFunction(() => document.querySelector('[data-field="model.dir"]').classList.contains("invalid"));
  assert.match(await page.textContent('[data-field="model.dir"] .field-error'), /not a model/);
});

test("the chat picker offers the models served end to end; Stop ends an answer", async () => {
  await openWith({ models: MODELS, answer: Array.from({ length: 200 }, (_, i) => ` w${i}`) });
  await page.click('.nav[data-screen="chat"]');
  await page.waitForFunction(() => document.querySelector("#chat-model").options.length === 1);
  assert.equal(await page.inputValue("#chat-model"), "9e2f4a61c0b3d875", "the incomplete model is not offered");
  await page.fill("#chat-input", "hello");
  await page.press("#chat-input", "Enter");
  await page.waitForFunction(() => document.querySelector(".msg.assistant .text").textContent.includes("w3"));
  await page.click("#chat-stop");
  await page.waitForFunction(() => document.querySelector("#chat-stop").hidden);
  const [stop] = await calls("stop_chat");
  const [asked] = await calls("chat");
  assert.equal(stop.id, asked.id);
  assert.match(asked.onEvent, /^__CHANNEL__:\d+$/, "the answer streams over a channel");
  assert.deepEqual(asked.request.messages, [{ role: "user", content: "hello" }]);
  assert.ok(!(await page.textContent(".msg.assistant .text")).includes("w199"), "stopped before the end");
});

const bin = process.env.NEUROSHARD_BIN;

test("the chat page streams an answer from a loopback swarm, the same as generate", { skip: !bin && "NEUROSHARD_BIN is not set" }, async () => {
  const work = await mkdtemp(join(tmpdir(), "neuroshard-chat-"));
  const children = [];
  const start = (args) => {
    const child = spawn(bin, args, { stdio: ["ignore", "ignore", "pipe"] });
    children.push(child);
    return child;
  };
  try {
    // The shipped demo model with a template that passes the user's text through, as
    // scripts/api-check.sh does; two nodes serve it through a tracker, `serve` over them.
    const demo = join(work, "demo");
    await cp(join(here, "..", "..", "models", "demo"), demo, { recursive: true });
    await writeFile(join(demo, "chat_template.jinja"), "{% for m in messages %}{{ m['content'] }}{% endfor %}");
    const { child: trackerChild, url: tracker } = await startTracker(bin);
    children.push(trackerChild);
    for (const layers of ["0..3", "3..6"]) {
      const node = start(["node", "--model", demo, "--layers", layers, "--tracker", tracker, "--host", "127.0.0.1", "--no-lan", "--data-dir", join(work, `data-${layers}`)]);
      await awaitLine(node, /serving layers/);
    }
    const [, api] = await awaitLine(start(["serve", "--tracker", tracker, "--no-lan", "--model", demo, "--listen", "127.0.0.1:0"]), /at (http:\S+) \(OpenAI-compatible/);
    const prompt = "Four score and seven years ago";
    const expected = JSON.parse(
      execFileSync(bin, ["generate", "--tracker", tracker, "--no-lan", "--model", demo, "--chat", prompt, "--max-new-tokens", "24", "--json"], { encoding: "utf8" }),
    );

    // The page's chat command, bridged to the API's stream: each SSE chunk goes to the page
    // as it arrives.
    let pieces = 0;
    await page.exposeFunction("__swarmChat", async (id, channel, request) => {
      const reply = await fetch(`${api}/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ ...request, model: "demo", stream: true, stream_options: { include_usage: true } }),
      });
      assert.equal(reply.status, 200);
      let buffered = "";
      let finish = null;
      const decoder = new TextDecoder();
      for await (const bytes of reply.body) {
        buffered += decoder.decode(bytes, { stream: true });
        let cut;
        while ((cut = buffered.indexOf("\n\n")) >= 0) {
          const line = buffered.slice(0, cut).replace(/^data: /, "");
          buffered = buffered.slice(cut + 2);
          if (line === "[DONE]") continue;
          const chunk = JSON.parse(line);
          const choice = chunk.choices[0];
          if (choice?.delta?.content) {
            pieces += 1;
            await page.evaluate(([c, text]) => window.__mock.send(c, { kind: "text", text }), [channel, choice.delta.content]);
          }
          if (choice?.finish_reason) finish = choice.finish_reason;
          if (chunk.usage) {
            await page.evaluate(([c, event]) => window.__mock.send(c, event), [channel, { kind: "done", finish, usage: chunk.usage, templated: true }]);
          }
        }
      }
    });
    await openWith({ models: [MODELS[1]] });
    await page.click('.nav[data-screen="chat"]');
    await page.waitForFunction(() => document.querySelector("#chat-model").value !== "");
    await page.fill("#chat-temp", "0");
    await page.fill("#chat-max", "24");
    await page.fill("#chat-input", prompt);
    await page.click("#chat-send");
    await page.waitForFunction(() => document.querySelector("#chat-usage").textContent !== "", null, { timeout: 60_000 });
    assert.equal(await page.textContent(".msg.assistant .text"), expected.text);
    assert.ok(pieces > 1, `streamed in ${pieces} pieces`);
    assert.match(await page.textContent("#chat-usage"), /\+ 24 tokens · stopped at the token limit/);
    await page.screenshot({ path: join(shots, "chat.png"), fullPage: true });
  } finally {
    for (const child of children) child.kill();
    await rm(work, { recursive: true, force: true });
  }
});
