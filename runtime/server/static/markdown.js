// A small markdown renderer: fenced code blocks, inline code, headings, bold, italics,
// lists, links (http/https only). Everything is HTML-escaped first: a model's text never
// becomes markup it did not ask for.
"use strict";
(function () {
  function esc(s) {
    return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }
  function inline(s) {
    const codes = [];
    s = s.replace(/`([^`\n]+)`/g, function (_, c) { codes.push(c); return "\u0000" + (codes.length - 1) + "\u0000"; });
    s = esc(s);
    s = s.replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^*])\*([^*\n]+)\*/g, "$1<em>$2</em>")
      .replace(/\[([^\]]+)\]\((https?:\/\/[^)\s]+)\)/g, '<a href="$2" rel="noopener noreferrer" target="_blank">$1</a>');
    return s.replace(/\u0000(\d+)\u0000/g, function (_, i) { return "<code>" + esc(codes[+i]) + "</code>"; });
  }
  function render(text) {
    const out = [];
    const parts = text.split(/^```/m);
    parts.forEach(function (part, i) {
      if (i % 2 === 1) { // inside a fence: the first line names the language
        const nl = part.indexOf("\n");
        const lang = nl < 0 ? "" : part.slice(0, nl).trim();
        const code = nl < 0 ? "" : part.slice(nl + 1).replace(/\n$/, "");
        out.push('<pre><code class="lang-' + esc(lang) + '">' + esc(code) + "</code></pre>");
        return;
      }
      let list = null;
      part.split("\n\n").forEach(function (block) {
        const lines = block.split("\n").filter(function (l) { return l.trim() !== ""; });
        if (!lines.length) return;
        const html = [];
        lines.forEach(function (line) {
          const h = line.match(/^(#{1,6})\s+(.*)$/);
          const li = line.match(/^\s*(?:[-*+]|\d+\.)\s+(.*)$/);
          if (li) {
            if (!list) { list = []; }
            list.push("<li>" + inline(li[1]) + "</li>");
            return;
          }
          if (list) { html.push("<ul>" + list.join("") + "</ul>"); list = null; }
          if (h) html.push("<h" + h[1].length + ">" + inline(h[2]) + "</h" + h[1].length + ">");
          else html.push(inline(line));
        });
        if (list) { html.push("<ul>" + list.join("") + "</ul>"); list = null; }
        out.push("<p>" + html.join("<br>").replace(/<br>(<(?:ul|h\d)>)/g, "$1").replace(/(<\/(?:ul|h\d)>)<br>/g, "$1") + "</p>");
      });
    });
    return out.join("");
  }
  window.tandemMarkdown = { render: render, escape: esc };
})();
