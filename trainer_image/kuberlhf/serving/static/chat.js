// The chat page: talks to this server's /v1/chat/completions with streaming (fetch + ReadableStream, SSE lines),
// keeps the conversation in `history` (multi-turn), and `Clear` starts over. Plain JS, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let history = [];   // [{role, content}] sent with every request
let modelId = null;
let busy = false;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "Human:" : role === "assistant" ? "Assistant:" : "Error:";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.append(who, body);
  $("log").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return resp.status + ": " + body.error.message;
  } catch (e) { /* not JSON */ }
  return resp.status + " " + resp.statusText;
}

async function loadModel() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) { $("model").textContent = await errorText(resp); return; }
    const body = await resp.json();
    modelId = body.data[0].id;
    $("model").textContent = "model: " + modelId;
  } catch (e) {
    $("model").textContent = "server unreachable: " + e;
  }
}

// Reads an SSE body and calls onData(json) per `data:` event until `data: [DONE]`.
async function readEvents(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      for (const line of event.split(/\r?\n/)) {
        if (!line.startsWith("data:")) continue;  // comments (": ping") and other fields
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  if (!modelId) await loadModel();
  if (!modelId) { addMessage("error", "no model: is the server up (and the API key right)?"); return; }
  addMessage("user", text);
  const pending = [...history, { role: "user", content: text }];
  const div = addMessage("assistant", "");
  div.dataset.state = "streaming";
  const out = div.querySelector(".text");
  let answer = "";
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({
        model: modelId,
        messages: pending,
        stream: true,
        max_tokens: Number($("max-tokens").value) || 128,
        temperature: Number($("temperature").value),
        top_p: Number($("top-p").value) || 1,
      }),
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readEvents(resp, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        answer += delta.content;
        out.textContent = answer;
        div.scrollIntoView({ block: "end" });
      }
    });
    history = [...pending, { role: "assistant", content: answer }];
    div.dataset.state = "done";
  } catch (e) {
    div.remove();
    addMessage("error", String(e.message || e));
  }
}

$("composer").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || busy) return;
  busy = true;
  $("send").disabled = true;
  $("input").value = "";
  try { await send(text); } finally { busy = false; $("send").disabled = false; $("input").focus(); }
});

$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});

$("clear").addEventListener("click", () => {
  history = [];
  $("log").replaceChildren();
  $("input").focus();
});

$("api-key").addEventListener("change", loadModel);
loadModel();
