// Receipts: totals, a paged table, CSV export.
import { call } from "./ipc.js";
import * as fmt from "./format.js";

const $ = (id) => document.getElementById(id);
const PER_PAGE = 25;
let page = 0;
let pages = 1;

function cell(text, className) {
  const td = document.createElement("td");
  if (className) td.className = className;
  td.textContent = text;
  return td;
}

function row(r) {
  const tr = document.createElement("tr");
  const badge = document.createElement("span");
  badge.className = `badge ${r.status}`;
  badge.textContent = r.status;
  const status = document.createElement("td");
  status.append(badge);
  tr.append(
    cell(fmt.time(r.created_ms)),
    cell(fmt.layers({ start: r.layer_start, end: r.layer_end })),
    cell(fmt.count(r.tokens), "num"),
    cell(r.status !== "verified" ? "—" : r.vouched ? fmt.credit(r.credit) : "unvouched", "num"),
    status,
    cell(r.spot_checked ? "re-executed" : ""),
  );
  tr.title = `receipt ${r.id}\nsession ${r.session_id}\nrequester ${r.requester}`;
  if (r.evidence) tr.title += `\nvoided: ${r.evidence}`;
  if (r.status === "verified" && !r.vouched) {
    tr.title += `\n${fmt.credit(r.credit)} credit not counted: no issuer you trust vouches for this requester`;
  }
  return tr;
}

function totals(id, t) {
  $(id).textContent = `${fmt.credit(t.credit)} credit`;
  const unvouched = t.unvouched > 0 ? ` · ${fmt.credit(t.unvouched)} unvouched, not counted` : "";
  $(`${id}-sub`).textContent = `${fmt.count(t.receipts)} receipts · ${fmt.count(t.tokens)} tokens${unvouched}`;
}

async function load() {
  const filter = $("receipt-filter").value || null;
  const [result, sums] = await Promise.all([
    call("receipts", { status: filter, page, perPage: PER_PAGE }),
    call("receipt_totals"),
  ]);
  totals("total-today", sums.today);
  totals("total-week", sums.week);
  totals("total-life", sums.lifetime);
  pages = Math.max(1, Math.ceil(result.total / PER_PAGE));
  $("receipt-rows").replaceChildren(...result.rows.map(row));
  $("receipts-empty").hidden = result.total > 0;
  $("receipt-count").textContent = `${fmt.count(result.total)} receipt${result.total === 1 ? "" : "s"}`;
  $("page-label").textContent = `Page ${page + 1} of ${pages}`;
  $("page-prev").disabled = page === 0;
  $("page-next").disabled = page + 1 >= pages;
}

export function init() {
  $("page-prev").addEventListener("click", () => {
    page = Math.max(0, page - 1);
    load();
  });
  $("page-next").addEventListener("click", () => {
    page = Math.min(pages - 1, page + 1);
    load();
  });
  $("receipt-filter").addEventListener("change", () => {
    page = 0;
    load();
  });
  $("export").addEventListener("click", async () => {
    const message = $("export-message");
    message.className = "form-message";
    try {
      const path = await call("export_receipts", {});
      message.textContent = `Exported every receipt to ${path}`;
      message.classList.add("ok");
    } catch (e) {
      message.textContent = `Export failed: ${e.message}`;
      message.classList.add("bad");
    }
  });
}

export function opened() {
  load().catch((e) => {
    $("receipt-count").textContent = e.message;
  });
}
