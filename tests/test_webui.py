"""The web chat page (issue 17 part 5): served from the package, nothing from a CDN, and
used in a real headless Chromium against a real server with SmolLM2: a message sent and its
answer streamed, Stop, Regenerate, the conversation found again after a reload, markdown
and collapsed reasoning; a screenshot for the note."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path

import httpx2
import pytest
import uvicorn

from runtime.server import webui
from runtime.server.app import create_app
from runtime.server.models import RegistryOptions

CHROMIUM = os.environ.get("TANDEM_CHROMIUM", "/usr/bin/chromium")
SCREENSHOT = Path(os.environ.get("TANDEM_WEBUI_SCREENSHOT", "/work/notes/webui.png"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-dev-shm-usage", "--no-first-run"]  # fmt: skip


class Server:
    def __init__(self, app) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def bare():
    srv = Server(create_app(RegistryOptions(num_ctx=512)))
    yield srv
    srv.stop()


def test_the_page_and_its_assets_come_from_the_package(bare):
    page = httpx2.get(f"{bare.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "tandem chat" in page.text
    for src in re.findall(r'(?:src|href)="([^"]+)"', page.text):
        assert src.startswith("/"), f"{src}: the page loads nothing from elsewhere"
        assert httpx2.get(f"{bare.url}{src}").status_code == 200, src
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx2.get(f"{bare.url}/static/../app.py").status_code == 404
    assert httpx2.get(f"{bare.url}/static/nosuch.js").status_code == 404


def test_docs_are_local_and_the_cdn_pages_are_gone(bare):
    docs = httpx2.get(f"{bare.url}/docs")
    assert docs.status_code == 200
    assert "/v1/chat/completions" in docs.text and "/api/chat" in docs.text
    assert not re.search(r"(?:src|href)=['\"]https?:", docs.text)
    assert "cdn" not in docs.text.lower()
    assert httpx2.get(f"{bare.url}/redoc").status_code == 404
    assert httpx2.get(f"{bare.url}/openapi.json").status_code == 200


def test_no_webui_leaves_the_plain_answer(bare, monkeypatch):
    monkeypatch.setattr(webui, "enabled", False)
    page = httpx2.get(f"{bare.url}/")
    assert page.status_code == 200 and page.text == "tandem is running"
    assert httpx2.get(f"{bare.url}/static/app.js").status_code == 404


def test_no_webui_flag_parses():
    from runtime.cli.main import build_parser

    assert build_parser().parse_args(["serve", "--no-webui"]).no_webui is True


# -- in a real browser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium chromium-driver)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright drives Chromium")
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        except Exception as err:  # a browser that cannot start here
            pytest.skip(f"Chromium did not start: {err}")
        yield b
        b.close()


@pytest.fixture(scope="module")
def served(smollm2_path):
    srv = Server(create_app(RegistryOptions(num_ctx=1024), preload="smollm2"))
    deadline = time.time() + 300
    while httpx2.get(f"{srv.url}/health").status_code != 200:
        assert time.time() < deadline, "the model never became ready"
        time.sleep(0.2)
    yield srv
    srv.stop()


def assistant_texts(page) -> list[str]:
    return page.eval_on_selector_all(".msg.assistant .content", "ns => ns.map(n => n.innerText)")


def test_chat_in_chromium(browser, served, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(served.url)
    page.wait_for_selector("#model option[value='smollm2:latest']", state="attached")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")

    # send: the answer grows on the page while it streams, then gets its tok/s. The page records
    # the answer's length each time the DOM changes (a MutationObserver callback runs once per
    # network read the page renders), so a fast model cannot outrun a polling loop here.
    page.evaluate(
        "() => { window.seenLengths = [];"
        " new MutationObserver(() => { const n = document.querySelectorAll('.msg.assistant .content');"
        " const len = n.length ? n[n.length - 1].innerText.length : 0;"
        " const s = window.seenLengths; if (len && s[s.length - 1] !== len) s.push(len); })"
        ".observe(document.getElementById('messages'), { childList: true, subtree: true }); }"
    )
    page.fill("#input", "Tell me about the moon.")
    page.press("#input", "Enter")
    page.wait_for_function(
        "() => document.querySelector('#stop').disabled"
        " && document.querySelector('.msg.assistant .stats')",
        timeout=120_000,
    )
    seen = page.evaluate("() => window.seenLengths")
    assert len(seen) >= 3, f"the answer did not arrive piece by piece: {seen}"
    stats = page.inner_text(".msg.assistant .stats")
    assert re.search(r"\d+ tokens, [\d.]+ tok/s", stats), stats

    # stop: a long answer cut short
    page.fill("#max_tokens", "400")  # within num_ctx 1024 with the conversation
    page.fill("#input", "Write a very long essay about the history of astronomy.")
    page.press("#input", "Enter")
    page.wait_for_function(
        "() => { const n = document.querySelectorAll('.msg.assistant .content');"
        " return (n.length === 2 && n[1].innerText.length > 0)"
        " || document.querySelector('.msg .error'); }",
        timeout=120_000,
    )
    assert page.query_selector(".msg .error") is None, page.inner_text(".msg .error")
    page.click("#stop")
    page.wait_for_selector(".msg.assistant:nth-of-type(4) .stats", timeout=30_000)
    assert "(stopped)" in page.inner_text(".msg.assistant:nth-of-type(4) .stats")
    assert page.is_disabled("#stop") and not page.is_disabled("#send")

    # regenerate: the stopped answer replaced by a whole one
    page.fill("#max_tokens", "16")
    page.click("#regenerate")
    page.wait_for_function(
        "() => { const s = document.querySelectorAll('.msg.assistant .stats');"
        " return s.length === 2 && !s[1].innerText.includes('stopped'); }",
        timeout=120_000,
    )
    assert len(assistant_texts(page)) == 2 and assistant_texts(page)[1]

    # markdown with a code block, and reasoning collapsed (a stored conversation shown)
    html = page.evaluate("window.tandemMarkdown.render('Run:\\n\\n```py\\nx < 1\\n```')")
    assert "<pre><code" in html and "x &lt; 1" in html
    page.evaluate(
        """() => { const s = window.tandemChat.state();
        s.conversations.push({id: 'r1', title: 'thinking', messages: [
          {role: 'user', content: 'q'},
          {role: 'assistant', content: '<think>step one</think>The **answer**.'}]});
        localStorage.setItem('tandem.conversations', JSON.stringify(s)); }"""
    )

    # reload: the conversations are still there
    page.reload()
    page.wait_for_selector(".msg.assistant")
    assert len(assistant_texts(page)) == 2
    titles = page.eval_on_selector_all("#conversations li span", "ns => ns.map(n => n.innerText)")
    assert "Tell me about the moon." in titles and "thinking" in titles
    page.click("#conversations li:has-text('thinking')")
    details = page.wait_for_selector(".msg.assistant details.reasoning")
    assert details.get_attribute("open") is None  # collapsed
    assert page.inner_text(".msg.assistant .content strong") == "answer"
    page.click("#conversations li:has-text('Tell me about the moon.')")
    page.wait_for_selector(".msg.assistant .stats")

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shot = tmp_path / "webui.png"
    page.screenshot(path=str(shot), full_page=True)
    shutil.copy(shot, SCREENSHOT)
    assert not errors, errors
    page.close()
