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
