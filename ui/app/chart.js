// Work and credit over time as an SVG: bars for tokens served, a line for credit earned, each on
// its own scale, with the axis labelled in the range's own unit (hours or days).

const NS = "http://www.w3.org/2000/svg";

function el(name, attrs, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text != null) node.textContent = text;
  return node;
}

function niceMax(v) {
  if (v <= 0) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 5, 10].map((m) => m * p).find((m) => m >= v);
}

function short(n) {
  if (n >= 1e6) return `${(n / 1e6).toFixed(n >= 1e7 ? 0 : 1)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(n >= 1e4 ? 0 : 1)}k`;
  return `${Math.round(n * 100) / 100}`;
}

/** Draws `points` ([{start_ms, tokens, credit}]) into `container`. */
export function drawChart(container, points, range) {
  const width = 900;
  const height = 220;
  const pad = { left: 48, right: 52, top: 26, bottom: 26 };
  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none" });
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const maxTokens = niceMax(Math.max(0, ...points.map((p) => p.tokens)));
  const maxCredit = niceMax(Math.max(0, ...points.map((p) => p.credit)));
  for (let i = 0; i <= 4; i += 1) {
    const y = pad.top + plotH - (plotH * i) / 4;
    svg.append(el("line", { class: "grid", x1: pad.left, x2: width - pad.right, y1: y, y2: y }));
    svg.append(el("text", { class: "axis", x: pad.left - 6, y: y + 4, "text-anchor": "end" }, short((maxTokens * i) / 4)));
    svg.append(el("text", { class: "axis", x: width - pad.right + 6, y: y + 4 }, short((maxCredit * i) / 4)));
  }
  const slot = plotW / Math.max(points.length, 1);
  const line = [];
  points.forEach((p, i) => {
    const h = (plotH * p.tokens) / maxTokens;
    const x = pad.left + i * slot;
    const bar = el("rect", { class: "bar", x: x + slot * 0.15, y: pad.top + plotH - h, width: slot * 0.7, height: Math.max(h, 0) });
    const when = new Date(p.start_ms);
    const label = range === "7d"
      ? when.toLocaleDateString("en-GB", { weekday: "short", day: "numeric" })
      : when.toLocaleTimeString("en-GB", { hour: "2-digit", minute: "2-digit" });
    bar.append(el("title", {}, `${label}: ${Math.round(p.tokens)} tokens, ${short(p.credit)} credit`));
    svg.append(bar);
    line.push(`${x + slot / 2},${pad.top + plotH - (plotH * p.credit) / maxCredit}`);
    const every = range === "7d" ? 1 : 3;
    if (i % every === 0) {
      svg.append(el("text", { class: "axis", x: x + slot / 2, y: height - 8, "text-anchor": "middle" }, label));
    }
  });
  if (line.length) {
    svg.append(el("polyline", { class: "credit", points: line.join(" ") }));
    for (const pt of line) {
      const [cx, cy] = pt.split(",");
      svg.append(el("circle", { class: "dot", cx, cy, r: 2.5 }));
    }
  }
  svg.append(el("text", { class: "axis", x: pad.left - 6, y: 10, "text-anchor": "end" }, "tokens"));
  svg.append(el("text", { class: "axis", x: width - pad.right + 6, y: 10 }, "credit"));
  container.replaceChildren(svg);
}
