// The settings form: one patch to `update_settings`; a refused value shows beside its field.
import { call } from "./ipc.js";
import * as fmt from "./format.js";

const $ = (id) => document.getElementById(id);
const DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const DAY_NAMES = { mon: "Monday", tue: "Tuesday", wed: "Wednesday", thu: "Thursday", fri: "Friday", sat: "Saturday", sun: "Sunday" };
/** Each notification's checkbox and its settings key. */
const NOTICES = [["f-note-temperature", "temperature"], ["f-note-layers", "layers_fetched"], ["f-note-receipt", "first_receipt"], ["f-note-reach", "reachability"]];
let current = null;
let estimateTimer = null;
let swarmModels = [];

/** Shows `error` beside the field it names (or its nearest named parent); false if none. */
export function showFieldErrors(root, error) {
  if (!error.field) return false;
  let path = error.field;
  while (path) {
    const field = root.querySelector(`[data-field="${CSS.escape(path)}"]`);
    if (field) {
      field.classList.add("invalid");
      const slot = field.querySelector(".field-error");
      slot.textContent = path === error.field ? error.message : `${error.field}: ${error.message}`;
      field.scrollIntoView?.({ block: "center" });
      field.querySelector("input, select, textarea")?.focus();
      return true;
    }
    path = path.replace(/(\[\d+\]|\.[^.[]+)$/, "");
  }
  return false;
}

export function clearFieldErrors(root) {
  for (const field of root.querySelectorAll(".field.invalid")) field.classList.remove("invalid");
  for (const slot of root.querySelectorAll(".field-error")) slot.textContent = "";
}

function minutes(text) {
  const [h, m] = text.split(":").map(Number);
  return h * 60 + m;
}

function hhmm(total) {
  if (total >= 1440) return "24:00";
  return `${String(Math.floor(total / 60)).padStart(2, "0")}:${String(total % 60).padStart(2, "0")}`;
}

function windowRow(w) {
  const li = document.createElement("li");
  const day = document.createElement("select");
  day.className = "w-day";
  for (const d of DAYS) day.append(new Option(DAY_NAMES[d], d, false, d === w.day));
  const start = document.createElement("input");
  start.type = "time";
  start.className = "w-start";
  start.value = hhmm(w.start_minute);
  const end = document.createElement("input");
  end.type = "time";
  end.className = "w-end";
  end.value = hhmm(w.end_minute === 1440 ? 1439 : w.end_minute);
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "secondary small";
  remove.textContent = "Remove";
  remove.addEventListener("click", () => li.remove());
  li.append(day, "from", start, "to", end, remove);
  return li;
}

function fill(s) {
  current = s;
  $("f-name").value = s.profile.display_name ?? "";
  $("f-anon").checked = s.profile.anonymous;
  $("f-login").checked = s.profile.launch_at_login;
  const mode = s.layers.mode;
  for (const r of document.querySelectorAll('input[name="layer-mode"]')) r.checked = r.value === mode;
  $("f-layer-start").value = s.layers.start ?? 0;
  $("f-layer-end").value = s.layers.end ?? 1;
  $("f-layer-count").value = s.layers.count ?? 1;
  $("f-device").value = s.compute.device;
  $("f-share").value = s.compute.gpu_share_percent;
  $("f-vram").value = s.compute.vram_budget_mib;
  $("f-threads").value = s.compute.cpu_threads;
  $("f-precision").value = s.compute.precision;
  $("f-up").value = s.bandwidth.upload_kbps;
  $("f-down").value = s.bandwidth.download_kbps;
  const cap = s.bandwidth.transfer_cap;
  $("f-cap-on").checked = Boolean(cap);
  $("f-cap-gb").value = cap?.gigabytes ?? 100;
  $("f-cap-days").value = cap?.every_days ?? 30;
  $("f-idle-on").checked = s.schedule.only_when_idle;
  $("f-idle-min").value = s.schedule.idle_minutes;
  $("f-battery").checked = s.schedule.pause_on_battery;
  $("windows").replaceChildren(...s.schedule.weekly.map(windowRow));
  $("f-cpu-limit").value = s.thermal.cpu_limit_c ?? "";
  $("f-gpu-limit").value = s.thermal.gpu_limit_c ?? "";
  $("f-min-hold").value = s.thermal.min_hold_secs;
  $("f-programs").value = s.gaming.programs.join("\n");
  $("f-fullscreen").checked = s.gaming.hold_when_fullscreen;
  for (const [id, key] of NOTICES) $(id).checked = s.notifications[key];
  $("f-disk-cap").value = s.storage.cap_mib ?? "";
  $("f-tracker").value = s.network.tracker ?? "";
  $("f-bootstrap").value = s.network.bootstrap.join("\n");
  for (const r of document.querySelectorAll('input[name="model-source"]')) r.checked = r.value === s.model.source;
  $("f-model-dir").value = s.model.dir ?? "";
  $("f-api-on").checked = s.api.enabled;
  $("f-api-port").value = s.api.port;
  showLayerInputs();
  showModelInputs();
  renderModels();
}

/** One cell per layer, darker with more providers; an empty cell is a layer nobody serves. */
function coverageBar(coverage) {
  const bar = document.createElement("span");
  bar.className = "coverage";
  bar.setAttribute("role", "img");
  const missing = coverage.filter((c) => c === 0).length;
  bar.setAttribute("aria-label", missing ? `${missing} of ${coverage.length} layers have no provider` : `every layer has a provider`);
  coverage.forEach((count, layer) => {
    const cell = document.createElement("span");
    cell.className = "cov";
    cell.dataset.n = String(Math.min(count, 3));
    cell.title = `layer ${layer}: ${count} provider${count === 1 ? "" : "s"}`;
    bar.append(cell);
  });
  return bar;
}

function renderModels() {
  const chosen = current?.model.source === "swarm" ? current.model.id : null;
  const picked = document.querySelector('input[name="swarm-model"]:checked')?.value ?? chosen;
  const rows = swarmModels.map((m) => {
    const tr = document.createElement("tr");
    const pick = document.createElement("input");
    pick.type = "radio";
    pick.name = "swarm-model";
    pick.value = m.id;
    pick.checked = m.id === picked;
    pick.setAttribute("aria-label", `Serve model ${m.id}`);
    pick.addEventListener("change", () => {
      document.querySelector('input[name="model-source"][value="swarm"]').checked = true;
      showModelInputs();
    });
    const name = document.createElement("td");
    name.textContent = fmt.model(m);
    const cov = document.createElement("td");
    cov.append(coverageBar(m.coverage));
    const nodes = document.createElement("td");
    nodes.className = "num";
    nodes.textContent = String(m.providers);
    const first = document.createElement("td");
    first.append(pick);
    tr.append(first, name, cov, nodes);
    tr.dataset.model = m.id;
    return tr;
  });
  $("model-rows").replaceChildren(...rows);
  $("models-empty").hidden = swarmModels.length > 0;
}

async function loadSwarmModels() {
  try {
    swarmModels = await call("swarm_models");
  } catch (e) {
    swarmModels = [];
    showFieldErrors($("settings-form"), { field: "model", message: e.message });
  }
  renderModels();
}

function modelChoice() {
  const source = document.querySelector('input[name="model-source"]:checked')?.value ?? "demo";
  if (source === "swarm") return { source, id: document.querySelector('input[name="swarm-model"]:checked')?.value ?? null };
  if (source === "local") return { source, dir: $("f-model-dir").value.trim() };
  return { source };
}

function showModelInputs() {
  const source = modelChoice().source;
  $("model-swarm").hidden = source !== "swarm";
  $("model-local").hidden = source !== "local";
  if (source === "swarm" && !swarmModels.length) loadSwarmModels();
}

function number(id) {
  const text = $(id).value.trim();
  return text === "" ? null : Number(text);
}

function layerChoice() {
  const mode = document.querySelector('input[name="layer-mode"]:checked')?.value ?? "auto";
  if (mode === "range") return { mode, start: number("f-layer-start"), end: number("f-layer-end") };
  if (mode === "count") return { mode, count: number("f-layer-count") };
  return { mode: "auto" };
}

/** The whole form as a merge patch. */
export function patch() {
  const anonymous = $("f-anon").checked;
  const name = $("f-name").value.trim();
  return {
    profile: {
      display_name: anonymous || !name ? null : name,
      anonymous,
      launch_at_login: $("f-login").checked,
    },
    layers: layerChoice(),
    compute: {
      device: $("f-device").value,
      gpu_share_percent: number("f-share"),
      vram_budget_mib: number("f-vram"),
      cpu_threads: number("f-threads"),
      precision: $("f-precision").value,
    },
    bandwidth: {
      upload_kbps: number("f-up"),
      download_kbps: number("f-down"),
      transfer_cap: $("f-cap-on").checked ? { gigabytes: number("f-cap-gb"), every_days: number("f-cap-days") } : null,
    },
    schedule: {
      only_when_idle: $("f-idle-on").checked,
      idle_minutes: number("f-idle-min"),
      pause_on_battery: $("f-battery").checked,
      weekly: [...$("windows").children].map((li) => ({
        day: li.querySelector(".w-day").value,
        start_minute: minutes(li.querySelector(".w-start").value || "00:00"),
        end_minute: Math.max(minutes(li.querySelector(".w-end").value || "00:00"), 1) + (li.querySelector(".w-end").value === "23:59" ? 1 : 0),
      })),
    },
    thermal: {
      cpu_limit_c: number("f-cpu-limit"),
      gpu_limit_c: number("f-gpu-limit"),
      min_hold_secs: number("f-min-hold"),
    },
    gaming: {
      programs: $("f-programs").value.split("\n").map((l) => l.trim()).filter(Boolean),
      hold_when_fullscreen: $("f-fullscreen").checked,
    },
    notifications: Object.fromEntries(NOTICES.map(([id, key]) => [key, $(id).checked])),
    storage: { cap_mib: number("f-disk-cap") },
    network: {
      tracker: $("f-tracker").value.trim() || null,
      bootstrap: $("f-bootstrap").value.split("\n").map((l) => l.trim()).filter(Boolean),
    },
    model: modelChoice(),
    api: { enabled: $("f-api-on").checked, port: number("f-api-port") },
  };
}

function showLayerInputs() {
  const mode = layerChoice().mode;
  $("layer-range").hidden = mode !== "range";
  $("layer-count").hidden = mode !== "count";
  clearTimeout(estimateTimer);
  estimateTimer = setTimeout(estimate, 150);
}

async function estimate() {
  const out = $("layer-estimate");
  const field = out.closest(".field");
  try {
    const plan = await call("plan_layers", { choice: layerChoice() });
    field.classList.remove("invalid");
    field.querySelector(".field-error").textContent = "";
    out.textContent = `Serves layers ${fmt.layers(plan.range)} of ${plan.total_layers}: about ${fmt.bytes(plan.memory.total_bytes)} of memory (${fmt.bytes(plan.memory.weights_bytes)} weights, ${fmt.bytes(plan.memory.cache_bytes)} cache).`;
  } catch (e) {
    out.textContent = "";
    showFieldErrors($("settings-form"), { field: "layers", message: e.message });
  }
}

export async function load() {
  const s = await call("get_settings");
  fill(s);
  return s;
}

export function status(st) {
  const fetch = st.fetch;
  $("model-fetch").hidden = !fetch;
  if (fetch) {
    const share = fetch.total_bytes ? fetch.done_bytes / fetch.total_bytes : 0;
    $("model-fetch-fill").style.width = `${(share * 100).toFixed(1)}%`;
    $("model-fetch-text").textContent = fmt.fetching(fetch);
  }
  $("api-state").textContent = st.api_url
    ? `Serving at ${st.api_url}: point any OpenAI client there (no key needed on this computer).`
    : st.api_error
      ? `Not serving: ${st.api_error}`
      : "Off.";
  $("thermal-now").textContent = thermalNow(st.temperatures);
  const bw = st.bandwidth;
  $("cap-usage").textContent = bw.period_cap_bytes
    ? `Used ${fmt.bytes(bw.period_bytes)} of ${fmt.bytes(bw.period_cap_bytes)} this period.`
    : `Used ${fmt.bytes(bw.period_bytes)} since the meter started.`;
}

/** The temperatures now, and a limit that holds nothing because its sensor cannot be read. */
function thermalNow(t) {
  const unread = [];
  if (current?.thermal.cpu_limit_c != null && t?.cpu_c == null) unread.push("CPU");
  if (current?.thermal.gpu_limit_c != null && t?.gpu_c == null) unread.push("GPU");
  const note = unread.length ? ` No ${unread.join(" or ")} sensor can be read here, so that limit holds nothing.` : "";
  return `Now: ${fmt.temperatures(t)}.${note}`;
}

function addPrograms(names) {
  const have = $("f-programs").value.split("\n").map((l) => l.trim()).filter(Boolean);
  const lower = new Set(have.map((n) => n.toLowerCase()));
  $("f-programs").value = [...have, ...names.filter((n) => !lower.has(n.toLowerCase()))].join("\n");
}

async function loadDiskUsage() {
  try {
    const usage = await call("storage_usage");
    const cap = usage.cap_bytes == null ? "no cap" : `of ${fmt.bytes(usage.cap_bytes)}`;
    const models = usage.models.length === 1 ? "1 fetched model" : `${usage.models.length} fetched models`;
    $("disk-usage").textContent = `Using ${fmt.bytes(usage.used_bytes)} ${cap}: ${models} and the receipts.`;
  } catch (e) {
    $("disk-usage").textContent = e.message;
  }
}

let choices = null;

async function loadProgramChoices() {
  try {
    choices = await call("program_choices");
  } catch {
    return;
  }
  const select = $("f-running");
  select.replaceChildren(new Option("Add a running program…", ""), ...choices.running.map((n) => new Option(n, n)));
  const hint = (i) => choices.suggested_limits.map(([preset, limits]) => `${limits[i]} ${preset}`).join(" · ");
  $("f-cpu-limit").placeholder = hint(0);
  $("f-gpu-limit").placeholder = hint(1);
}

export function init() {
  const form = $("settings-form");
  for (const r of document.querySelectorAll('input[name="layer-mode"]')) r.addEventListener("change", showLayerInputs);
  for (const id of ["f-layer-start", "f-layer-end", "f-layer-count", "f-vram"]) $(id).addEventListener("input", showLayerInputs);
  for (const r of document.querySelectorAll('input[name="model-source"]')) r.addEventListener("change", showModelInputs);
  $("models-refresh").addEventListener("click", loadSwarmModels);
  $("f-running").addEventListener("change", (event) => {
    if (event.target.value) addPrograms([event.target.value]);
    event.target.value = "";
  });
  $("add-launchers").addEventListener("click", () => addPrograms(choices?.launchers ?? []));
  $("add-window").addEventListener("click", () => {
    $("windows").append(windowRow({ day: "mon", start_minute: 18 * 60, end_minute: 23 * 60 }));
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    const message = $("settings-message");
    message.className = "form-message";
    const model = modelChoice();
    if (model.source === "swarm" && !model.id) {
      showFieldErrors(form, { field: "model", message: "pick one of the swarm's models, or another source" });
      message.textContent = "Not saved: fix the field marked in red.";
      message.classList.add("bad");
      return;
    }
    message.textContent = "Saving…";
    try {
      fill(await call("update_settings", { patch: patch() }));
      loadDiskUsage();
      message.textContent = "Saved. The node follows the new settings.";
      message.classList.add("ok");
    } catch (e) {
      showFieldErrors(form, e);
      message.textContent = e.field ? "Not saved: fix the field marked in red." : `Not saved: ${e.message}`;
      message.classList.add("bad");
    }
  });
}

export function opened() {
  if (current) fill(current);
  if (modelChoice().source === "swarm") loadSwarmModels();
  loadProgramChoices();
  loadDiskUsage();
  $("settings-message").textContent = "";
  clearFieldErrors($("settings-form"));
}
