// The dashboard: live state from the `status` event, the owner's controls, and the chart.
import { call } from "./ipc.js";
import * as fmt from "./format.js";
import { drawChart } from "./chart.js";

const $ = (id) => document.getElementById(id);
let range = "24h";
let last = null;
let chartTimer = null;

/** Redraws the chart soon: new receipts came in. */
function chartSoon() {
  clearTimeout(chartTimer);
  chartTimer = setTimeout(refreshChart, 1500);
}

function setText(id, text) {
  $(id).textContent = text;
}

function meter(id, used, cap) {
  const fill = $(id);
  const share = cap ? Math.min(used / cap, 1) : 0;
  fill.style.width = `${(share * 100).toFixed(1)}%`;
  fill.classList.toggle("full", cap > 0 && share >= 1);
}

export function render(status) {
  if (last && status.receipts_today !== last.receipts_today) chartSoon();
  last = status;
  const pill = $("state-pill");
  pill.dataset.state = status.state;
  pill.textContent = fmt.STATE_LABELS[status.state] ?? status.state;
  setText("state-detail", status.detail ?? (status.address ? `at ${status.address}` : ""));
  const ownerHold = ["paused", "snoozed", "draining"].includes(status.state);
  const toggle = $("toggle-pause");
  toggle.textContent = ownerHold ? "Resume" : "Pause now";
  toggle.disabled = !(ownerHold || status.state === "serving" || status.state === "waiting");
  $("drain").disabled = status.state !== "serving";
  $("snooze").disabled = status.state !== "serving";

  setText("stat-layers", fmt.layers(status.layers));
  setText("stat-model", status.total_layers ? `of ${status.total_layers} · model ${status.model_id ?? ""}` : "");
  setText("stat-fetch", status.fetch ? fmt.fetching(status.fetch) : "");
  setText("stat-tps", status.tokens_per_s.toFixed(1));
  const where = { gpu: " on the GPU", cpu: " on the CPU" }[status.device] ?? "";
  setText("stat-device", `tokens per second${where}`);
  setText("stat-device-note", status.device_note ?? "");
  setText("stat-temps", fmt.temperatures(status.temperatures));
  setText("stat-sessions", fmt.count(status.sessions));
  setText("stat-inflight", `${status.in_flight} request${status.in_flight === 1 ? "" : "s"} in flight`);
  setText("stat-latency", status.latency_ms > 0 ? `${status.latency_ms.toFixed(1)} ms` : "—");
  setText("stat-peers", fmt.count(status.peers));
  setText("stat-reach", `reachability: ${status.reachability}`);
  $("stat-reach").title = status.reachability_advice ?? "";
  setText("stat-receipts", fmt.count(status.receipts_today));
  setText("stat-credit", `${fmt.credit(status.credit_today)} credit · ${status.receipts_pending} pending`);

  const bw = status.bandwidth;
  const capText = (kbps) => (kbps ? `of ${fmt.rate(kbps * 1000)}` : "no cap");
  meter("meter-up", bw.up_bps, bw.up_cap_kbps * 1000);
  setText("text-up", `${fmt.rate(bw.up_bps)} ${capText(bw.up_cap_kbps)}`);
  meter("meter-down", bw.down_bps, bw.down_cap_kbps * 1000);
  setText("text-down", `${fmt.rate(bw.down_bps)} ${capText(bw.down_cap_kbps)}`);
  meter("meter-period", bw.period_bytes, bw.period_cap_bytes ?? 0);
  setText(
    "text-period",
    bw.period_cap_bytes ? `${fmt.bytes(bw.period_bytes)} of ${fmt.bytes(bw.period_cap_bytes)}` : `${fmt.bytes(bw.period_bytes)} · no cap`,
  );
}

async function refreshChart() {
  try {
    drawChart($("chart"), await call("series", { range }), range);
  } catch (e) {
    $("chart").textContent = e.message;
  }
}

async function act(command, args) {
  try {
    render(await call(command, args));
  } catch (e) {
    setText("state-detail", e.message);
  }
}

export function init() {
  $("toggle-pause").addEventListener("click", () => {
    const resume = ["paused", "snoozed", "draining"].includes(last?.state);
    act("set_paused", { paused: !resume });
  });
  $("drain").addEventListener("click", () => act("drain"));
  $("snooze").addEventListener("change", (event) => {
    const length = event.target.value;
    event.target.value = "";
    if (length) act("snooze", { length });
  });
  for (const button of document.querySelectorAll("[data-range]")) {
    button.addEventListener("click", () => {
      range = button.dataset.range;
      for (const b of document.querySelectorAll("[data-range]")) b.setAttribute("aria-pressed", String(b === button));
      refreshChart();
    });
  }
  setInterval(refreshChart, 60_000);
}

export function opened() {
  refreshChart();
}
