"""A real headless Chromium for tests, driven over the DevTools protocol.

No browser-automation package is needed: Chromium's DevTools endpoint is a
WebSocket speaking JSON, and the `websockets` library is already installed.

    with Browser() as browser:
        browser.open("http://127.0.0.1:18789/#token=...")
        browser.wait_for("document.title === 'Agent gateway'")
        browser.evaluate("document.querySelector('#text').value")

`.ci/run` installs Debian's chromium when it is missing. Locally, without
Chromium, the browser tests are skipped, unless REQUIRE_BROWSER=1 (as in CI)
makes a missing browser a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from itertools import count
from pathlib import Path

from websockets.sync.client import connect

# Flags for a quiet browser on a machine without network: no background traffic, no sandbox (root).
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--remote-debugging-port=0",
]


def find_chromium() -> str | None:
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )


class Browser:
    def __init__(self, timeout: float = 20):
        executable = find_chromium()
        if executable is None:
            raise FileNotFoundError("no chromium on PATH")
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-"))
        self.process = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.ids = count(1)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
            page = next(t for t in json.load(response) if t["type"] == "page")
        self.devtools = connect(page["webSocketDebuggerUrl"], max_size=None).__enter__()

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def command(self, method: str, params: dict | None = None, timeout: float = 10) -> dict:
        """Send one DevTools command and return its result (events in between are skipped)."""
        number = next(self.ids)
        self.devtools.send(json.dumps({"id": number, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.devtools.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == number:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def open(self, url: str) -> None:
        self.command("Page.navigate", {"url": url})

    def reload(self) -> None:
        self.command("Page.reload")

    def before_every_page(self, script: str) -> None:
        """Run script in each page opened from now on, before the page's own scripts
        (to watch what a page does, e.g. count the WebSockets it opens)."""
        self.command("Page.enable")  # without it, Chromium ignores the script below
        self.command("Page.addScriptToEvaluateOnNewDocument", {"source": script})

    def evaluate(self, expression: str):
        result = self.command(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10):
        """Evaluate until the expression is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None  # the page is still loading
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting in the browser for: {expression}")

    def close(self) -> None:
        if getattr(self, "devtools", None):
            self.devtools.close()
        self.process.kill()
        self.process.wait(timeout=5)
        shutil.rmtree(self.profile, ignore_errors=True)


def browser_required() -> bool:
    return os.getenv("REQUIRE_BROWSER") == "1"
