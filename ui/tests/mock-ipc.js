// A stand-in for the app behind window.__TAURI__: the commands the page calls, with state, and
// window.__mock to emit events and read the calls made. Runs in the page before its scripts.
export function installMock(seed) {
  const calls = [];
  const channels = {};
  let nextChannel = 1;
  // Tauri's Channel: the page sets `onmessage`; the app's side sends through its id.
  class Channel {
    constructor() {
      this.id = nextChannel++;
      this.onmessage = () => {};
      channels[this.id] = this;
    }
    toJSON() {
      return `__CHANNEL__:${this.id}`;
    }
  }
  const stopped = new Set();
  const listeners = {};
  const state = structuredClone(seed);
  const status = () => structuredClone(state.status);
  const fail = (field, message) => Promise.reject({ code: "invalid_setting", field, message });
  const merge = (target, patch) => {
    for (const [k, v] of Object.entries(patch)) {
      if (v && typeof v === "object" && !Array.isArray(v) && target[k] && typeof target[k] === "object") merge(target[k], v);
      else target[k] = v;
    }
    return target;
  };
  const commands = {
    get_settings: () => state.settings,
    get_status: status,
    update_settings: ({ patch }) => {
      const next = merge(structuredClone(state.settings), patch);
      const up = next.bandwidth.upload_kbps;
      if (!Number.isInteger(up) || up < 0 || up > 10_000_000) {
        return fail("bandwidth.upload_kbps", "must be a whole number of KB/s from 0 to 10000000");
      }
      if (next.compute.gpu_share_percent < 1 || next.compute.gpu_share_percent > 100) {
        return fail("compute.gpu_share_percent", "must be from 1 to 100");
      }
      const limit = next.thermal.cpu_limit_c;
      if (limit != null && (limit < 40 || limit > 105)) {
        return fail("thermal.cpu_limit_c", "must be 40 to 105 °C, or none");
      }
      state.settings = next;
      return next;
    },
    finish_first_run: ({ displayName, anonymous, preset }) => {
      state.settings.profile = { ...state.settings.profile, display_name: displayName, anonymous, onboarded: true };
      state.settings.preset = preset;
      state.status.state = "serving";
      return state.settings;
    },
    plan_layers: ({ choice }) => {
      if (choice.mode === "range" && choice.end > 6) return Promise.reject({ code: "invalid_setting", field: "layers", message: `layers ${choice.start}..${choice.end} go past the model's 6 layers` });
      return { range: { start: 0, end: 6 }, total_layers: 6, memory: { weights_bytes: 80e6, cache_bytes: 30e6, total_bytes: 110e6 } };
    },
    storage_usage: () => ({
      used_bytes: 1_500_000_000,
      cap_bytes: state.settings.storage.cap_mib == null ? null : state.settings.storage.cap_mib * 1048576,
      models: [{ id: "9e2f4a61c0b3d875", bytes: 1_400_000_000, last_used_ms: 0 }],
    }),
    program_choices: () => ({
      running: state.running ?? ["bash", "Game.exe"],
      launchers: ["steam", "gamescope", "lutris"],
      suggested_limits: [["light", [75, 70]], ["medium", [85, 80]], ["full", [95, 87]]],
    }),
    set_paused: ({ paused }) => {
      state.status.state = paused ? "paused" : "serving";
      return status();
    },
    drain: () => {
      state.status.state = "draining";
      return status();
    },
    snooze: ({ length }) => {
      state.status.state = "snoozed";
      state.status.detail = `until 15:30 (${length})`;
      return status();
    },
    receipts: ({ status: filter, page, perPage }) => {
      const rows = state.receipts.filter((r) => !filter || r.status === filter);
      return { rows: rows.slice(page * perPage, (page + 1) * perPage), total: rows.length, page, per_page: perPage };
    },
    receipt_totals: () => state.totals,
    series: ({ range }) => state.series[range],
    export_receipts: () => "/home/ada/Downloads/neuroshard-receipts-2026-11-23.csv",
    swarm_models: () => state.models ?? [],
    // Over a real swarm when the test bridges one in (window.__swarmChat streams the answer of
    // `neuroshard serve` back through __mock.send); else the seeded answer, piece by piece.
    chat: async ({ id, request, onEvent }) => {
      const channel = onEvent;
      if (window.__swarmChat) {
        await window.__swarmChat(id, channel.id, request);
        return null;
      }
      const pieces = state.answer ?? ["Hello", " from", " the", " swarm."];
      for (const text of pieces) {
        await new Promise((r) => setTimeout(r, 20));
        if (stopped.has(id)) return null;
        channel.onmessage({ kind: "text", text });
      }
      const usage = { prompt_tokens: 5, completion_tokens: pieces.length, total_tokens: 5 + pieces.length };
      channel.onmessage({ kind: "done", finish: "stop", usage, templated: true });
      return null;
    },
    stop_chat: ({ id }) => {
      stopped.add(id);
      return true;
    },
  };
  window.__mock = {
    calls,
    state,
    /** Hands `event` to the page through channel `id`. */
    send(id, event) {
      channels[id].onmessage(event);
    },
    emit(event, payload) {
      for (const handler of listeners[event] ?? []) handler({ event, id: 0, payload });
    },
  };
  window.__TAURI__ = {
    core: {
      Channel,
      async invoke(command, args = {}) {
        calls.push({ command, args: JSON.parse(JSON.stringify(args)) });
        const handler = commands[command];
        if (!handler) throw { code: "bad_request", message: `unknown command ${command}` };
        return structuredClone(await handler(args));
      },
    },
    event: {
      async listen(event, handler) {
        (listeners[event] ??= []).push(handler);
        return () => {};
      },
    },
  };
}
