// aserve's chat page: streams from this server's /v1/chat/completions with fetch and a
// ReadableStream SSE parser (EventSource cannot POST). Model text is only ever set through
// textContent, so nothing the model writes becomes HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "aserve-api-key";

const chat = {
  history: [],        // the turns sent back each time: {role, content}
  id: 0,              // bumped by New chat: an answer still arriving belongs to the old chat
  controller: null,   // the running request's AbortController
  apiKey: sessionStorage.getItem(KEY_STORAGE) || "",
};

function headers() {
  const h = { "Content-Type": "application/json" };
  if (chat.apiKey) h.Authorization = "Bearer " + chat.apiKey;
  return h;
}

function addMessage(kind, text) {
  const box = document.createElement("div");
  box.className = "msg " + kind;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  box.append(body);
  $("messages").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function showError(text) {
  addMessage("error", text);
}

function askForKey(message) {
  $("key-panel").hidden = false;
  $("api-key").focus();
  if (message) showError(message);
}

async function errorText(resp) {
  // OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
  let detail = "";
  try {
    const body = await resp.json();
    detail = body.error && body.error.message ? body.error.message : JSON.stringify(body);
  } catch (e) {
    detail = resp.statusText;
  }
  const what = { 400: "The request was refused", 401: "The API key was refused", 413: "The request is too large",
    503: "The server is busy or shutting down", 504: "The request timed out" }[resp.status] || "The server answered";
  return `${what} (${resp.status}): ${detail}`;
}

async function loadModels() {
  let resp;
  try {
    resp = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    showError("Cannot reach the server: " + e.message);
    return;
  }
  if (resp.status === 401) {
    askForKey(chat.apiKey ? await errorText(resp) : "");
    return;
  }
  if (!resp.ok) {
    showError(await errorText(resp));
    return;
  }
  const select = $("model");
  select.replaceChildren();
  for (const model of (await resp.json()).data) {
    const option = document.createElement("option");
    option.value = option.textContent = model.id;
    select.append(option);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Yields the data payload of each SSE event in the response body, as text.
async function* sseData(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();  // in stream mode: a character split between reads is kept whole
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) !== -1) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
        if (data.length) yield data.join("\n");  // lines starting ":" are keep-alive comments
      }
    }
  } finally {
    reader.cancel().catch(() => {});  // read no further (and, if unfinished, close the request)
  }
}

function requestBody(messages) {
  const body = {
    model: $("model").value || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  };
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  return body;
}

async function send(text) {
  if (chat.controller || !text.trim()) return;
  const chatId = chat.id;
  addMessage("user", text);
  const system = $("system").value.trim();
  const turns = [...chat.history, { role: "user", content: text }];
  const messages = system ? [{ role: "system", content: system }, ...turns] : turns;
  const controller = (chat.controller = new AbortController());
  setBusy(true);
  const box = addMessage("assistant", "");
  const out = box.querySelector(".text");
  const stats = document.createElement("div");
  stats.className = "stats";
  box.append(stats);
  const started = performance.now();
  let first = null, chunks = 0, finish = null, usage = null, done = false, failed = false;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)), signal: controller.signal,
    });
    if (!resp.ok) {
      failed = true;
      box.remove();
      const message = await errorText(resp);
      if (resp.status === 401) askForKey(message); else showError(message);
      return;
    }
    for await (const data of sseData(resp)) {
      if (data === "[DONE]") { done = true; break; }
      const chunk = JSON.parse(data);
      if (chunk.error) {  // the request failed after the stream began
        failed = true;
        showError(`The server stopped this answer: ${chunk.error.message}`);
        continue;
      }
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        if (first === null) first = performance.now();
        chunks += 1;
        out.textContent += choice.delta.content;
        box.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (!done && !failed) {
      failed = true;
      showError("The connection to the server was lost before the answer ended.");
    }
  } catch (e) {
    if (e.name === "AbortError") {
      finish = "stopped";
    } else {
      failed = true;
      showError("Lost the connection to the server: " + e.message);
    }
  } finally {
    if (chat.controller === controller) chat.controller = null;
    setBusy(false);
    const ended = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    const parts = [];
    if (first !== null) {
      parts.push(`TTFT ${Math.round(first - started)} ms`);
      if (ended > first && tokens > 1) parts.push(`${((tokens - 1) / ((ended - first) / 1000)).toFixed(1)} tok/s`);
    }
    if (finish) parts.push(`finish: ${finish}`);
    stats.textContent = parts.join(" · ");
  }
  // The turn joins the history once it has an answer, so that a failed turn can be sent again;
  // never into a new chat started meanwhile.
  if (out.textContent && !failed && chat.id === chatId) chat.history.push({ role: "user", content: text }, { role: "assistant", content: out.textContent });
}

function newChat() {
  chat.id += 1;
  if (chat.controller) chat.controller.abort();
  chat.history = [];
  $("messages").replaceChildren();
  $("prompt").focus();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  if (chat.controller) return;  // one answer at a time; the typed text stays in the box
  const text = $("prompt").value;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => chat.controller && chat.controller.abort());
$("new-chat").addEventListener("click", newChat);
$("key-panel").addEventListener("submit", (event) => {
  event.preventDefault();
  chat.apiKey = $("api-key").value.trim();
  sessionStorage.setItem(KEY_STORAGE, chat.apiKey);
  $("key-panel").hidden = true;
  loadModels();
});

loadModels();
