// Numbers and times as people read them.

export function bytes(n) {
  if (n == null) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i += 1;
  }
  return `${v >= 100 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

export function rate(bytesPerSecond) {
  return `${bytes(bytesPerSecond)}/s`;
}

export function count(n) {
  return Math.round(n).toLocaleString("en-US");
}

export function credit(c) {
  if (!c) return "0";
  return c >= 100 ? c.toFixed(0) : c >= 1 ? c.toFixed(2) : c.toPrecision(2);
}

/** Inclusive layer numbers, as the tray says them. */
export function layers(range) {
  if (!range) return "—";
  return range.end - range.start === 1 ? `${range.start}` : `${range.start}–${range.end - 1}`;
}

/** A parameter count: 494M, 1.2B. */
export function params(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(n >= 1e10 ? 0 : 1)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(n >= 1e7 ? 0 : 1)}M`;
  return `${Math.round(n / 1e3)}K`;
}

/** A model as the pickers name it: family, size and the start of its id. */
export function model(m) {
  const about = m.about ? `${m.about.family} · ${params(m.about.parameters)} parameters · ` : "";
  return `${about}${m.total_layers} layers · ${m.id.slice(0, 8)}`;
}

/** A fetch in progress, in words. */
export function fetching(f) {
  if (!f.layers) return `Fetching model ${f.model_id.slice(0, 8)}'s files…`;
  const share = f.total_bytes ? Math.floor((100 * f.done_bytes) / f.total_bytes) : 0;
  return `Fetching layers ${layers(f.layers)} of model ${f.model_id.slice(0, 8)}: ${share}% (${bytes(f.done_bytes)} of ${bytes(f.total_bytes)})`;
}

export function time(ms) {
  const d = new Date(ms);
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  const hm = d.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit" });
  return sameDay ? hm : `${d.toLocaleDateString("en-GB", { day: "numeric", month: "short" })} ${hm}`;
}

export const STATE_LABELS = {
  starting: "Starting",
  serving: "Serving",
  draining: "Finishing requests",
  paused: "Paused",
  snoozed: "Snoozed",
  setup: "Set-up needed",
  waiting: "Waiting",
  error: "Error",
  offline: "Offline",
};

/** "CPU 61 °C · GPU 55 °C", naming a sensor that cannot be read. */
export function temperatures(t) {
  const one = (name, c) => (c == null ? `${name} temperature unreadable here` : `${name} ${Math.round(c)} °C`);
  return `${one("CPU", t?.cpu_c)} · ${one("GPU", t?.gpu_c)}`;
}
