// Helpers for tests that drive the real app through WebKitWebDriver (via tauri-driver): the
// development build (app.test.js) and the installed package (installed.test.js).
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Builder, By } from "selenium-webdriver";

export const WAIT = 60_000;

/** Starts the app at `application` with `args` in a WebDriver session of tauri-driver's. */
export function openApp(application, args = []) {
  return new Builder()
    .usingServer(process.env.TAURI_DRIVER_URL ?? "http://127.0.0.1:4444/")
    .withCapabilities({ browserName: "wry", "tauri:options": { application, args } })
    .build();
}

/** Reads and waits on the page's text, and saves screenshots into `shots`. */
export function page(driver, shots) {
  const text = (css) => driver.executeScript("return document.querySelector(arguments[0])?.textContent ?? null", css);
  return {
    text,
    waitText: (css, predicate, what) => driver.wait(async () => predicate(await text(css)), WAIT, `${css}: ${what}`),
    shot: async (name) => writeFile(join(shots, name), await driver.takeScreenshot(), "base64"),
    nav: (screen) => driver.findElement(By.css(`.nav[data-screen="${screen}"]`)).click(),
  };
}

/** The tracker's view of the swarm, through the CLI. */
export function trackerStats(bin, trackerUrl) {
  return JSON.parse(execFileSync(bin, ["status", "--tracker", trackerUrl], { encoding: "utf8", timeout: WAIT }));
}

/** Asks the chat page for a greedy answer of 24 tokens and checks it streams, token for token
 * what `neuroshard generate` gives through the same swarm. */
export async function chatMatchesGenerate(driver, { bin, trackerUrl, model }) {
  const { text, waitText, nav } = page(driver);
  await nav("chat");
  await driver.wait(async () => (await driver.executeScript("return document.querySelector('#chat-model').value")) !== "", WAIT, "a model served end to end is offered");
  const expected = JSON.parse(
    execFileSync(bin, ["generate", "--tracker", trackerUrl, "--model", model, "--prompt", "Four score and seven years ago", "--max-new-tokens", "24", "--json"], { encoding: "utf8", timeout: WAIT }),
  );
  for (const [id, value] of [["chat-temp", "0"], ["chat-max", "24"]]) {
    const input = await driver.findElement(By.id(id));
    await input.clear();
    await input.sendKeys(value);
  }
  // Count the answer's visible states: it streams in pieces, not at once.
  await driver.executeScript(`
    window.__shown = new Set();
    new MutationObserver(() => {
      const t = document.querySelector(".msg.assistant .text");
      if (t) window.__shown.add(t.textContent);
    }).observe(document.querySelector("#chat-log"), { subtree: true, childList: true, characterData: true });
  `);
  await driver.findElement(By.id("chat-input")).sendKeys("Four score and seven years ago");
  await driver.findElement(By.id("chat-send")).click();
  await waitText("#chat-usage", (t) => t && t.includes("tokens"), "the answer ends");
  assert.equal(await text(".msg.assistant .text"), expected.text);
  assert.match(await text("#chat-usage"), /\+ 24 tokens · stopped at the token limit · no chat template/);
  const shown = await driver.executeScript("return window.__shown.size");
  assert.ok(shown > 2, `the answer showed in ${shown} states`);
}
