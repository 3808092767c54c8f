// The page's only door to the app: Tauri's global API (app.withGlobalTauri). Tests replace
// window.__TAURI__ with a mock before the page loads.

function tauri() {
  const api = window.__TAURI__;
  if (!api) throw new Error("NeuroShard's window API is missing: open this page from the app");
  return api;
}

/** A failed command as the app sends it: {code, message, field}. */
export class CommandError extends Error {
  constructor(raw) {
    const body = typeof raw === "object" && raw !== null ? raw : { code: "error", message: String(raw) };
    super(body.message || String(raw));
    this.code = body.code || "error";
    this.field = body.field || null;
  }
}

/** Invokes a command; a failure throws CommandError. */
export async function call(command, args = {}) {
  try {
    return await tauri().core.invoke(command, args);
  } catch (raw) {
    throw new CommandError(raw);
  }
}

/** Calls `handler(payload)` for every `event` from the app. */
export function on(event, handler) {
  return tauri().event.listen(event, (e) => handler(e.payload));
}

/** A channel the app streams a command's events over; `onmessage` gets each in order. */
export function channel(onmessage) {
  const ch = new (tauri().core.Channel)();
  ch.onmessage = onmessage;
  return ch;
}
