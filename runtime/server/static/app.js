// tandem's chat page: conversations in localStorage, answers streamed from
// /v1/chat/completions (Server-Sent Events), Stop aborts the request, Regenerate asks again.
"use strict";
(function () {
  const KEY = "tandem.conversations";
  const $ = function (id) { return document.getElementById(id); };
  const md = window.tandemMarkdown;
  let state = load();
  let controller = null;

  function load() {
    try {
      const s = JSON.parse(localStorage.getItem(KEY) || "null");
      if (s && Array.isArray(s.conversations)) return s;
    } catch (e) { /* a damaged store starts over */ }
    return { conversations: [], current: null };
  }
  function save() { localStorage.setItem(KEY, JSON.stringify(state)); }
  function current() {
    let c = state.conversations.find(function (x) { return x.id === state.current; });
    if (!c) {
      c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat", messages: [] };
      state.conversations.unshift(c);
      state.current = c.id;
    }
    return c;
  }

  // -- reasoning: <think>…</think> in the content, or delta.reasoning_content ------------------
  function split(text) {
    const m = text.match(/^\s*<think>([\s\S]*?)(<\/think>|$)([\s\S]*)$/);
    if (!m) return { reasoning: "", answer: text };
    return { reasoning: m[1], answer: m[3] };
  }

  function renderMessage(m) {
    const div = document.createElement("div");
    div.className = "msg " + m.role;
    const role = document.createElement("div");
    role.className = "role";
    role.textContent = m.role === "user" ? "You" : (m.model || "assistant");
    div.appendChild(role);
    const parts = split(m.content || "");
    const reasoning = (m.reasoning || "") + parts.reasoning;
    if (reasoning) {
      const d = document.createElement("details");
      d.className = "reasoning";
      d.innerHTML = "<summary>Reasoning</summary>" + md.render(reasoning);
      div.appendChild(d);
    }
    const body = document.createElement("div");
    body.className = "content";
    body.innerHTML = m.role === "user" ? "<p>" + md.escape(m.content).replace(/\n/g, "<br>") + "</p>" : md.render(parts.answer);
    div.appendChild(body);
    if (m.error) {
      const e = document.createElement("div");
      e.className = "error";
      e.textContent = m.error;
      div.appendChild(e);
    }
    if (m.stats) {
      const s = document.createElement("div");
      s.className = "stats";
      s.textContent = m.stats;
      div.appendChild(s);
    }
    return div;
  }

  function render() {
    const c = current();
    const box = $("messages");
    box.innerHTML = "";
    c.messages.forEach(function (m) { box.appendChild(renderMessage(m)); });
    box.scrollTop = box.scrollHeight;
    const list = $("conversations");
    list.innerHTML = "";
    state.conversations.forEach(function (x) {
      const li = document.createElement("li");
      li.className = x.id === state.current ? "active" : "";
      const t = document.createElement("span");
      t.textContent = x.title;
      li.appendChild(t);
      const del = document.createElement("button");
      del.textContent = "×";
      del.title = "delete";
      del.onclick = function (ev) {
        ev.stopPropagation();
        state.conversations = state.conversations.filter(function (y) { return y.id !== x.id; });
        if (state.current === x.id) state.current = null;
        save(); render();
      };
      li.appendChild(del);
      li.onclick = function () { if (!controller) { state.current = x.id; save(); render(); } };
      list.appendChild(li);
    });
    $("system").value = c.system || "";
    const last = c.messages[c.messages.length - 1];
    $("regenerate").disabled = !!controller || !last || last.role !== "assistant";
  }

  function settings() {
    const body = {};
    ["temperature", "top_p", "max_tokens", "seed"].forEach(function (k) {
      const v = $(k).value;
      if (v !== "") body[k] = Number(v);
    });
    return body;
  }

  async function models() {
    try {
      const r = await fetch("/v1/models");
      const data = await r.json();
      const sel = $("model");
      sel.innerHTML = "";
      (data.data || []).forEach(function (m) {
        const o = document.createElement("option");
        o.value = o.textContent = m.id;
        sel.appendChild(o);
      });
      const saved = localStorage.getItem("tandem.model");
      if (saved && Array.from(sel.options).some(function (o) { return o.value === saved; })) sel.value = saved;
      if (!sel.options.length) $("status").textContent = "No models: `tandem pull smollm2`, then reload.";
    } catch (e) {
      $("status").textContent = "Cannot list models: " + e;
    }
  }

  async function ask() {
    const c = current();
    const model = $("model").value;
    const messages = [];
    if (c.system) messages.push({ role: "system", content: c.system });
    c.messages.forEach(function (m) { messages.push({ role: m.role, content: split(m.content).answer || m.content }); });
    const reply = { role: "assistant", content: "", model: model };
    c.messages.push(reply);
    let node = renderMessage(reply);
    $("messages").appendChild(node);
    controller = new AbortController();
    $("send").disabled = true; $("stop").disabled = false; $("regenerate").disabled = true;
    $("status").textContent = "…";
    const body = Object.assign({ model: model, messages: messages, stream: true, stream_options: { include_usage: true } }, settings());
    let first = null, pieces = 0, usage = null;
    const started = performance.now();
    try {
      const r = await fetch("/v1/chat/completions", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body), signal: controller.signal,
      });
      if (!r.ok) {
        const err = await r.json().catch(function () { return {}; });
        throw new Error((err.error && err.error.message) || ("HTTP " + r.status));
      }
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = "";
      for (;;) {
        const chunk = await reader.read();
        if (chunk.done) break;
        buf += decoder.decode(chunk.value, { stream: true });
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl).trim();
          buf = buf.slice(nl + 1);
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const ev = JSON.parse(data);
          if (ev.error) throw new Error(ev.error.message || String(ev.error));
          if (ev.usage) usage = ev.usage;
          const delta = ev.choices && ev.choices[0] && ev.choices[0].delta;
          if (!delta) continue;
          if (delta.reasoning_content) reply.reasoning = (reply.reasoning || "") + delta.reasoning_content;
          if (delta.content) {
            if (first === null) first = performance.now();
            pieces += 1;
            reply.content += delta.content;
          }
          const fresh = renderMessage(reply);
          node.replaceWith(fresh);
          node = fresh;
          fresh.scrollIntoView({ block: "end" });
        }
      }
    } catch (e) {
      if (e.name !== "AbortError") reply.error = String(e.message || e);
      else reply.stopped = true;
    } finally {
      const end = performance.now();
      const tokens = usage ? usage.completion_tokens : pieces;
      const seconds = first === null ? 0 : (end - first) / 1000;
      reply.stats = tokens + " tokens" + (seconds > 0 ? ", " + (tokens / seconds).toFixed(1) + " tok/s" : "") +
        ", " + ((end - started) / 1000).toFixed(1) + " s" + (reply.stopped ? " (stopped)" : "");
      controller = null;
      $("send").disabled = false; $("stop").disabled = true;
      $("status").textContent = "";
      save(); render();
    }
  }

  function send(text) {
    const c = current();
    c.system = $("system").value;
    if (c.messages.length === 0) c.title = text.slice(0, 40);
    c.messages.push({ role: "user", content: text });
    save(); render();
    ask();
  }

  $("composer").addEventListener("submit", function (ev) {
    ev.preventDefault();
    const text = $("input").value.trim();
    if (!text || controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", function () { if (controller) controller.abort(); });
  $("regenerate").addEventListener("click", function () {
    const c = current();
    if (controller || !c.messages.length || c.messages[c.messages.length - 1].role !== "assistant") return;
    c.messages.pop();
    save(); render();
    ask();
  });
  $("new-chat").addEventListener("click", function () { if (!controller) { state.current = null; current(); save(); render(); } });
  $("system").addEventListener("change", function () { current().system = $("system").value; save(); });
  $("model").addEventListener("change", function () { localStorage.setItem("tandem.model", $("model").value); });
  $("export").addEventListener("click", function () {
    const blob = new Blob([JSON.stringify(state, null, 1)], { type: "application/json" });
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "tandem-conversations.json";
    a.click();
    URL.revokeObjectURL(a.href);
  });
  $("import").addEventListener("change", async function (ev) {
    const file = ev.target.files[0];
    if (!file) return;
    try {
      const data = JSON.parse(await file.text());
      const list = Array.isArray(data) ? data : data.conversations;
      if (!Array.isArray(list)) throw new Error("no conversations in this file");
      const known = new Set(state.conversations.map(function (c) { return c.id; }));
      list.forEach(function (c) {
        if (c && Array.isArray(c.messages) && !known.has(c.id)) state.conversations.push(c);
      });
      save(); render();
      $("status").textContent = "Imported " + list.length + " conversation(s).";
    } catch (e) {
      $("status").textContent = "Import failed: " + e.message;
    }
    ev.target.value = "";
  });

  window.tandemChat = { state: function () { return state; } };
  render();
  models();
})();
