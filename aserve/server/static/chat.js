// aserve's chat page: streams from this server's /v1/chat/completions with fetch and a
// ReadableStream SSE parser (EventSource cannot POST), renders the answers' Markdown, and keeps
// the conversations in this browser (localStorage).
//
// Safety: Markdown is the only markup the model gets. Raw HTML in its text is rendered as text
// (marked's html renderer escapes it), images are shown as their alt text, and every rendering
// goes through DOMPurify, which removes scripts, event handlers, iframes, styles and any link
// that is not http(s) or mailto. With "Raw text" on, the text is set through textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "aserve-api-key";        // sessionStorage: the key lasts as long as the tab
const CHATS_STORAGE = "aserve-chats";        // localStorage: every conversation
const CURRENT_STORAGE = "aserve-current-chat";
const SETTINGS_STORAGE = "aserve-settings";

// ---------------------------------------------------------------- Markdown, safely

const escapeHtml = (s) => String(s).replace(/[&<>"']/g,
  (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

marked.use({
  gfm: true,
  breaks: true,  // a single newline is a line break, as chat models mean it
  renderer: {
    html(token) { return escapeHtml(token.text); },                 // raw HTML stays text
    image(token) { return escapeHtml(token.text || token.href || ""); },  // no remote images
  },
});

const PURIFY = {
  FORBID_TAGS: ["img", "iframe", "frame", "object", "embed", "script", "style", "form", "input", "button",
    "textarea", "select", "svg", "math", "video", "audio", "source", "link", "meta", "base"],
  FORBID_ATTR: ["style", "srcset"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
};
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

function copyText(text, button) {
  const done = () => { button.textContent = "Copied"; setTimeout(() => { button.textContent = "Copy"; }, 1200); };
  if (navigator.clipboard) navigator.clipboard.writeText(text).then(done, () => {});
}

function decorateCode(pre) {
  const code = pre.querySelector("code");
  const lang = code ? [...code.classList].find((c) => c.startsWith("language-")) : null;
  const wrap = document.createElement("div");
  wrap.className = "code";
  const bar = document.createElement("div");
  bar.className = "code-bar";
  const label = document.createElement("span");
  label.className = "lang";
  label.textContent = lang ? lang.slice("language-".length) : "text";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy-code";
  copy.textContent = "Copy";
  copy.addEventListener("click", () => copyText((code || pre).textContent, copy));
  bar.append(label, copy);
  pre.replaceWith(wrap);
  wrap.append(bar, pre);
}

// Shows `text` in `el`: Markdown, sanitized, or (raw) plain text. The raw text stays on the
// element, for copying and for what the page sends back.
function show(el, text) {
  el.dataset.raw = text;
  if (settings.raw) {
    el.classList.add("raw");
    el.textContent = text;
    return;
  }
  el.classList.remove("raw");
  el.innerHTML = DOMPurify.sanitize(marked.parse(text), PURIFY);
  for (const pre of el.querySelectorAll("pre")) decorateCode(pre);
}

// ---------------------------------------------------------------- state kept in the browser

// Storage may be blocked (privacy settings) or full (its quota): the page then works on, and
// says once that conversations are not being kept.
function storage(kind) {
  try {
    return kind === "session" ? window.sessionStorage : window.localStorage;
  } catch (e) {
    return null;
  }
}

function load(store, key, fallback) {
  try {
    const value = JSON.parse(store.getItem(key));
    return value === null ? fallback : value;
  } catch (e) {
    return fallback;
  }
}

let storageWarned = false;
function store(key, value) {
  try {
    if (value === null) storage().removeItem(key); else storage().setItem(key, value);
  } catch (e) {
    if (!storageWarned) showError("This browser is not keeping the conversations (its storage refused: " + e.message + ").");
    storageWarned = true;
  }
}

const settings = Object.assign({ system: "", temperature: "0.7", maxTokens: "256", model: "", raw: false },
  load(storage(), SETTINGS_STORAGE, {}));

const state = {
  chats: load(storage(), CHATS_STORAGE, []),  // [{id, title, messages: [{role, content, reasoning?, stats?}], updated}]
  current: load(storage(), CURRENT_STORAGE, null),  // id of the open chat; null: a new one, not saved yet
  controller: null,  // the running request's AbortController
  editing: null,     // index of the user message being edited
  apiKey: load(storage("session"), KEY_STORAGE, ""),
};

function saveChats() {
  store(CHATS_STORAGE, JSON.stringify(state.chats));
  store(CURRENT_STORAGE, state.current ? JSON.stringify(state.current) : null);
}

function saveSettings() {
  Object.assign(settings, {
    system: $("system").value, temperature: $("temperature").value, maxTokens: $("max-tokens").value,
    model: $("model").value || settings.model, raw: $("raw").checked,
  });
  store(SETTINGS_STORAGE, JSON.stringify(settings));
}

const currentChat = () => state.chats.find((c) => c.id === state.current) || null;

function openChat(id) {
  if (state.controller) state.controller.abort();
  state.current = id;
  state.editing = null;
  saveChats();
  renderChat();
  renderChatList();
}

function renderChatList() {
  const nav = $("chats");
  nav.replaceChildren();
  for (const c of [...state.chats].sort((a, b) => b.updated - a.updated)) {
    const item = document.createElement("div");
    item.className = "chat-item" + (c.id === state.current ? " current" : "");
    const open = actionButton(c.title, "open-chat", () => openChat(c.id));
    open.title = c.title;
    const rename = actionButton("✎", "rename-chat", () => {
      const title = prompt("Name this conversation", c.title);
      if (title && title.trim()) { c.title = title.trim(); saveChats(); renderChatList(); }
    });
    rename.title = rename.ariaLabel = "Rename";
    const remove = actionButton("✕", "delete-chat", () => {
      state.chats = state.chats.filter((x) => x.id !== c.id);
      if (state.current === c.id) {
        if (state.controller) state.controller.abort();
        state.current = null;
        renderChat();
      }
      saveChats();
      renderChatList();
    });
    remove.title = remove.ariaLabel = "Delete";
    item.append(open, rename, remove);
    nav.append(item);
  }
}

// ---------------------------------------------------------------- messages

function addMessage(kind, text) {
  const box = document.createElement("div");
  box.className = "msg " + kind;
  const body = document.createElement("div");
  body.className = "text";
  box.append(body);
  if (kind === "assistant") show(body, text);
  else { body.textContent = text; body.dataset.raw = text; }
  $("messages").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function showError(text) {
  addMessage("error", text);
}

function thinkingBlock(box) {
  let block = box.querySelector("details.thinking");
  if (!block) {
    block = document.createElement("details");
    block.className = "thinking";
    const summary = document.createElement("summary");
    summary.textContent = "Thinking";
    const text = document.createElement("div");
    text.className = "reasoning";
    block.append(summary, text);
    box.prepend(block);
  }
  return block.querySelector(".reasoning");
}

function actionButton(label, cls, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = cls;
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

// The buttons under a finished message: copy and (the last answer) regenerate; edit on user turns.
function addActions(box, index, message, chat) {
  const actions = document.createElement("div");
  actions.className = "actions";
  if (message.role === "assistant") {
    const copy = actionButton("Copy", "copy-answer", () => copyText(message.content, copy));
    actions.append(copy);
    if (index === chat.messages.length - 1) actions.append(actionButton("Regenerate", "regenerate", regenerate));
  } else {
    actions.append(actionButton("Edit", "edit", () => startEditing(index)));
  }
  box.append(actions);
}

function showStats(box, stats) {
  let line = box.querySelector(".stats");
  if (!line) {
    line = document.createElement("div");
    line.className = "stats";
    box.append(line);
  }
  line.textContent = stats || "";
}

function renderChat() {
  const chat = currentChat();
  $("messages").replaceChildren();
  $("editing").hidden = true;
  if (!chat) return;
  chat.messages.forEach((m, i) => {
    const box = addMessage(m.role, m.content);
    if (m.reasoning) thinkingBlock(box).textContent = m.reasoning;
    if (m.role === "assistant") showStats(box, m.stats);
    addActions(box, i, m, chat);
  });
}

function startEditing(index) {
  const chat = currentChat();
  if (!chat || state.controller) return;
  state.editing = index;
  $("prompt").value = chat.messages[index].content;
  $("editing").hidden = false;
  $("prompt").focus();
}

function cancelEditing() {
  state.editing = null;
  $("editing").hidden = true;
}

// ---------------------------------------------------------------- the server

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.apiKey) h.Authorization = "Bearer " + state.apiKey;
  return h;
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
    askForKey(state.apiKey ? await errorText(resp) : "");
    return;
  }
  if (!resp.ok) {
    showError(await errorText(resp));
    return;
  }
  const models = (await resp.json()).data;
  const select = $("model");
  select.replaceChildren();
  // LoRA adapters (cards with a parent) are listed under their base model.
  const option = (id, text) => {
    const o = document.createElement("option");
    o.value = id;
    o.textContent = text;
    select.append(o);
  };
  for (const base of models.filter((m) => !m.parent)) {
    option(base.id, base.id);
    for (const adapter of models.filter((m) => m.parent === base.id)) option(adapter.id, "\u00a0\u00a0↳ " + adapter.id);
  }
  for (const orphan of models.filter((m) => m.parent && !models.some((b) => b.id === m.parent))) option(orphan.id, orphan.id);
  if (settings.model && models.some((m) => m.id === settings.model)) select.value = settings.model;
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
  const body = { model: $("model").value || undefined, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (!Number.isNaN(maxTokens)) body.max_tokens = maxTokens;
  return body;
}

// The figures under an answer: time to the first token, and the decode speed, counted over the
// tokens after the first and the time from the first token to the last (not to the stream's end,
// which a late finish or usage chunk would stretch), with the count from the usage chunk.
function figures(t) {
  const parts = [];
  if (t.first !== null) {
    parts.push(`TTFT ${Math.round(t.first - t.started)} ms`);
    const tokens = t.usage ? t.usage.completion_tokens : t.chunks;
    if (tokens > 1 && t.last > t.first) parts.push(`${((tokens - 1) / ((t.last - t.first) / 1000)).toFixed(1)} tok/s`);
    if (t.usage) parts.push(`${t.usage.completion_tokens} tokens`);
  }
  if (t.finish) parts.push(`finish: ${t.finish}`);
  return parts.join(" · ");
}

// Streams an answer to the chat's messages (its last is the user's) and appends it; says whether
// it did.
async function generate(chat) {
  const chatId = chat.id;
  const system = $("system").value.trim();
  const turns = chat.messages.map((m) => ({ role: m.role, content: m.content }));
  const messages = system ? [{ role: "system", content: system }, ...turns] : turns;
  const controller = (state.controller = new AbortController());
  setBusy(true);
  const box = addMessage("assistant", "");
  const out = box.querySelector(".text");
  showStats(box, "");  // filled in when the answer ends
  let content = "", reasoning = "", rendering = false, failed = false, done = false;
  const t = { started: performance.now(), first: null, last: null, chunks: 0, usage: null, finish: null };
  const render = () => {  // at most once a frame, however many deltas arrive
    if (rendering) return;
    rendering = true;
    requestAnimationFrame(() => { rendering = false; show(out, content); box.scrollIntoView({ block: "end" }); });
  };
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(messages)), signal: controller.signal,
    });
    if (!resp.ok) {
      failed = true;
      box.remove();
      const message = await errorText(resp);
      if (resp.status === 401) askForKey(message); else showError(message);
      return false;
    }
    for await (const data of sseData(resp)) {
      if (data === "[DONE]") { done = true; break; }
      const chunk = JSON.parse(data);
      if (chunk.error) {  // the request failed after the stream began
        failed = true;
        showError(`The server stopped this answer: ${chunk.error.message}`);
        continue;
      }
      if (chunk.usage) t.usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.content || delta.reasoning_content) {
        const now = performance.now();
        if (t.first === null) t.first = now;
        t.last = now;
        t.chunks += 1;
      }
      if (delta.reasoning_content) {
        reasoning += delta.reasoning_content;
        thinkingBlock(box).textContent = reasoning;
      }
      if (delta.content) {
        content += delta.content;
        render();
      }
      if (choice.finish_reason) t.finish = choice.finish_reason;
    }
    if (!done && !failed) {
      failed = true;
      showError("The connection to the server was lost before the answer ended.");
    }
  } catch (e) {
    if (e.name === "AbortError") {
      t.finish = "stopped";
    } else {
      failed = true;
      showError("Lost the connection to the server: " + e.message);
    }
  } finally {
    if (state.controller === controller) state.controller = null;
    setBusy(false);
  }
  show(out, content);
  const stats = figures(t);
  showStats(box, stats);
  // The answer joins the conversation once it has text (a stopped one too), so a failed turn
  // can be sent again; never into another chat opened meanwhile.
  if (content && !failed && state.current === chatId) {
    const message = { role: "assistant", content, stats };
    if (reasoning) message.reasoning = reasoning;
    chat.messages.push(message);
    chat.updated = Date.now();
    saveChats();
    renderChat();
    renderChatList();
    return true;
  }
  return false;
}

async function send(text) {
  if (state.controller || !text.trim()) return;
  saveSettings();
  let chat = currentChat();
  if (!chat) {
    chat = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: text.trim().slice(0, 40),
      messages: [], updated: Date.now() };
    state.chats.push(chat);
    state.current = chat.id;
  }
  if (state.editing !== null) {  // an earlier turn, edited: the conversation continues from there
    chat.messages = chat.messages.slice(0, state.editing);
    cancelEditing();
  } else if (chat.messages.length && chat.messages[chat.messages.length - 1].role === "user") {
    chat.messages.pop();  // a turn that got no answer (refused, failed) is not sent again as history
  }
  chat.messages.push({ role: "user", content: text });
  chat.updated = Date.now();
  saveChats();
  renderChat();
  renderChatList();
  await generate(chat);
}

async function regenerate() {
  const chat = currentChat();
  if (state.controller || !chat || !chat.messages.length || chat.messages[chat.messages.length - 1].role !== "assistant") return;
  saveSettings();
  const previous = chat.messages.pop();
  renderChat();
  if (!(await generate(chat)) && state.current === chat.id && chat.messages[chat.messages.length - 1].role === "user") {
    chat.messages.push(previous);  // the new answer failed: the old one stays
    saveChats();
    renderChat();
  }
}

function newChat() {
  openChat(null);
  $("prompt").focus();
}

// ---------------------------------------------------------------- wiring

$("system").value = settings.system;
$("temperature").value = settings.temperature;
$("max-tokens").value = settings.maxTokens;
$("raw").checked = settings.raw;
for (const id of ["system", "temperature", "max-tokens", "model"]) $(id).addEventListener("change", saveSettings);
$("raw").addEventListener("change", () => {
  saveSettings();
  if (!state.controller) renderChat();  // a streaming answer takes the setting at its next frame
});

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.controller) return;  // one answer at a time; the typed text stays in the box
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
document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape") return;
  if (state.controller) state.controller.abort();
  else if (state.editing !== null) { cancelEditing(); $("prompt").value = ""; }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("new-chat").addEventListener("click", newChat);
$("key-panel").addEventListener("submit", (event) => {
  event.preventDefault();
  state.apiKey = $("api-key").value.trim();
  try {
    storage("session").setItem(KEY_STORAGE, JSON.stringify(state.apiKey));
  } catch (e) { /* kept for this page only */ }
  $("key-panel").hidden = true;
  loadModels();
});

if (state.current && !currentChat()) state.current = null;
renderChat();
renderChatList();
loadModels();
