// The first run: a display name or anonymity, and a preset. Nothing is lent before it.
import { call } from "./ipc.js";
import { showFieldErrors, clearFieldErrors } from "./settings.js";

const $ = (id) => document.getElementById(id);

export function open(current) {
  $("fr-name").value = current.profile.display_name ?? "";
  $("fr-anon").checked = current.profile.anonymous;
  $("first-run").hidden = false;
  $("fr-name").focus();
}

export function init(done) {
  const form = $("first-run-form");
  $("fr-anon").addEventListener("change", () => {
    $("fr-name").disabled = $("fr-anon").checked;
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearFieldErrors(form);
    $("first-run-message").textContent = "";
    const anonymous = $("fr-anon").checked;
    const name = $("fr-name").value.trim();
    if (!anonymous && !name) {
      showFieldErrors(form, { field: "profile.display_name", message: "Pick a display name, or choose to stay anonymous." });
      return;
    }
    const preset = form.querySelector('input[name="preset"]:checked')?.value ?? "medium";
    try {
      await call("finish_first_run", { displayName: anonymous ? null : name, anonymous, preset });
      $("first-run").hidden = true;
      await done();
    } catch (e) {
      if (!showFieldErrors(form, e)) $("first-run-message").textContent = e.message;
    }
  });
}
