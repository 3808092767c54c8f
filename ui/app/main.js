// Starts the page: screens, the live status, the first run.
import { call, on } from "./ipc.js";
import { STATE_LABELS } from "./format.js";
import * as dashboard from "./dashboard.js";
import * as settings from "./settings.js";
import * as receipts from "./receipts.js";
import * as chat from "./chat.js";
import * as firstRun from "./first-run.js";

const screens = { dashboard, chat, settings, receipts };

export function show(name) {
  if (!screens[name]) return;
  for (const key of Object.keys(screens)) {
    document.getElementById(`screen-${key}`).hidden = key !== name;
  }
  for (const button of document.querySelectorAll(".nav")) {
    if (button.dataset.screen === name) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  screens[name].opened?.();
}

function showStatus(status) {
  document.getElementById("sidebar-state").textContent = STATE_LABELS[status.state] ?? status.state;
  dashboard.render(status);
  settings.status(status);
}

async function start() {
  for (const module of Object.values(screens)) module.init();
  firstRun.init(async () => {
    await settings.load();
    showStatus(await call("get_status"));
  });
  for (const button of document.querySelectorAll(".nav")) {
    button.addEventListener("click", () => show(button.dataset.screen));
  }
  await on("status", showStatus);
  await on("navigate", show);
  const current = await settings.load();
  if (!current.profile.onboarded) firstRun.open(current);
  showStatus(await call("get_status"));
  show("dashboard");
  document.body.dataset.ready = "true";
}

start().catch((e) => {
  document.body.dataset.ready = "error";
  document.getElementById("state-detail").textContent = e.message;
});
