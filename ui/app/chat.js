// The chat page: an OpenAI-shaped chat request to the `chat` command, whose answer streams
// back over a channel piece by piece; the model picker lists what the swarm serves end to end.
import { call, channel } from "./ipc.js";
import * as fmt from "./format.js";

const $ = (id) => document.getElementById(id);
let messages = [];
let models = [];
let answering = null;
let counter = 0;

function number(id, fallback) {
  const v = Number($(id).value);
  return Number.isFinite(v) && $(id).value.trim() !== "" ? v : fallback;
}

function bubble(role, text) {
  const li = document.createElement("li");
  li.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Swarm";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  li.append(who, body);
  $("chat-log").append(li);
  $("chat-empty").hidden = true;
  li.scrollIntoView?.({ block: "end" });
  return body;
}

function busy(on) {
  $("chat-send").disabled = on || !$("chat-model").value;
  $("chat-stop").hidden = !on;
  $("chat-input").disabled = on;
}

/** Fills the picker with the models every layer of which has a provider now. */
export async function loadModels() {
  const select = $("chat-model");
  const before = select.value;
  try {
    models = (await call("swarm_models")).filter((m) => m.complete);
  } catch (e) {
    models = [];
    $("chat-note").textContent = `The swarm's models are unknown: ${e.message}`;
  }
  select.replaceChildren(...models.map((m) => new Option(fmt.model(m), m.id)));
  if (models.some((m) => m.id === before)) select.value = before;
  if (!models.length) {
    select.append(new Option("No model is served end to end right now", ""));
    $("chat-note").textContent = "Every layer of a model needs a node serving it before the swarm can answer.";
  } else {
    const m = models.find((x) => x.id === select.value);
    $("chat-note").textContent = m.providers === 1 ? "1 node serves this model." : `${m.providers} nodes serve this model.`;
  }
  busy(Boolean(answering));
}

async function send(text) {
  const model = $("chat-model").value;
  if (!model || answering) return;
  $("chat-error").textContent = "";
  $("chat-usage").textContent = "";
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  out.parentElement.classList.add("streaming");
  const id = `chat-${Date.now()}-${(counter += 1)}`;
  let reply = "";
  let finished;
  const done = new Promise((resolve) => (finished = resolve));
  const events = channel((event) => {
    if (event.kind === "text") {
      reply += event.text;
      out.textContent = reply;
    } else if (event.kind === "done") {
      const how = event.finish === "length" ? " · stopped at the token limit" : "";
      const mode = event.templated ? "" : " · no chat template: the model continued your text";
      $("chat-usage").textContent = `${event.usage.prompt_tokens} + ${event.usage.completion_tokens} tokens${how}${mode}`;
      finished();
    }
  });
  answering = id;
  busy(true);
  const request = {
    model,
    messages: messages.slice(),
    temperature: number("chat-temp", 0.7),
    max_tokens: number("chat-max", 256),
  };
  try {
    await call("chat", { id, request, onEvent: events });
    // The last pieces may still be on their way when the command returns; a stopped answer
    // has no end event.
    await Promise.race([done, new Promise((r) => setTimeout(r, 2000))]);
  } catch (e) {
    $("chat-error").textContent = e.field ? `${e.field}: ${e.message}` : e.message;
  } finally {
    out.parentElement.classList.remove("streaming");
    if (reply) messages.push({ role: "assistant", content: reply });
    else if (!$("chat-error").textContent) out.textContent = "(no answer)";
    answering = null;
    busy(false);
    $("chat-input").focus();
  }
}

export function init() {
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text) return;
    $("chat-input").value = "";
    send(text);
  });
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("chat-stop").addEventListener("click", () => {
    if (answering) call("stop_chat", { id: answering });
  });
  $("chat-new").addEventListener("click", () => {
    messages = [];
    $("chat-log").replaceChildren();
    $("chat-empty").hidden = false;
    $("chat-usage").textContent = "";
    $("chat-error").textContent = "";
  });
  $("chat-refresh").addEventListener("click", loadModels);
  $("chat-model").addEventListener("change", () => {
    $("chat-new").click();
    loadModels();
  });
  busy(false);
}

export function opened() {
  loadModels();
}
