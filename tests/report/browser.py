"""Headless Chromium driven over the DevTools protocol, for the report's browser tests.

Why the protocol and not `chromium --dump-dom`: a console error or an uncaught exception does
not show in the dumped DOM, and parsing `--enable-logging` output depends on Chromium's log
format. `--remote-debugging-pipe` gives the events themselves (Runtime.exceptionThrown,
Runtime.consoleAPICalled, Log.entryAdded) on fds 3 and 4 — no port, no websocket library — and
lets the test read the rendered DOM and take a screenshot in the same session.

    python tests/report/browser.py REPORT.html SHOT.png    # the README's docs/report.png

Imported by the test modules beside it (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Where to look for the browser: $FUSEGRAPH_CHROMIUM, then Debian's and others' names.
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    explicit = os.environ.get("FUSEGRAPH_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


class BrowserError(RuntimeError):
    """The browser did not start, answer or load the page in time."""


class Browser:
    """One headless Chromium; `open(url)` gives a `Page`. Use as a context manager."""

    def __init__(self, executable: str, *, timeout: float = 60.0):
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="fusegraph-chromium-")
        commands_r, self._to_browser = os.pipe()
        self._from_browser, events_w = os.pipe()
        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--hide-scrollbars", "--disable-dev-shm-usage",
                f"--user-data-dir={self._profile}", "about:blank"]

        def as_fds_3_and_4():
            # The browser reads commands on fd 3 and writes answers and events on fd 4. Copies
            # above 10 first, so that moving one pipe end onto 3 or 4 never closes the other.
            commands, events = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_r, events_w))
            os.dup2(commands, 3)
            os.dup2(events, 4)

        # close_fds=False: Python's own descriptors are close-on-exec anyway; only 3 and 4,
        # made inheritable by dup2, reach the browser.
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, close_fds=False, preexec_fn=as_fds_3_and_4)
        os.close(commands_r)
        os.close(events_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict] = []

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self.call("Browser.close", timeout=5)
            except (BrowserError, OSError):
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    # -- the protocol: JSON messages separated by NUL bytes -----------------------------------
    def call(self, method: str, params: dict | None = None, *, session: str | None = None,
             timeout: float | None = None) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        reply = self._wait(lambda m: m.get("id") == message["id"], timeout)
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str, timeout: float | None = None) -> dict:
        for i, event in enumerate(self._events):
            if event.get("method") == method and event.get("sessionId") == session:
                return self._events.pop(i)
        return self._wait(lambda m: m.get("method") == method and m.get("sessionId") == session, timeout,
                          keep=False)

    def events(self, session: str) -> list[dict]:
        return [e for e in self._events if e.get("sessionId") == session]

    def _wait(self, wanted, timeout: float | None, keep: bool = False) -> dict:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if wanted(message):
                    return message
                if "method" in message:
                    self._events.append(message)
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("the browser did not answer in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if ready:
                chunk = os.read(self._from_browser, 1 << 20)
                if not chunk:
                    raise BrowserError(f"the browser exited (code {self._proc.poll()})")
                self._buffer += chunk

    def open(self, url: str, *, width: int = 1400, height: int = 1800) -> "Page":
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=session)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        self.wait_event("Page.loadEventFired", session)
        return Page(self, target, session)


class Page:
    def __init__(self, browser: Browser, target: str, session: str):
        self.browser = browser
        self.target = target
        self.session = session

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-able values only)."""
        result = self.browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                         "awaitPromise": True}, session=self.session)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:60]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Uncaught exceptions, console.error/assert calls and error log entries so far."""
        self.evaluate("0")  # a round trip: events sent before it have arrived
        found = []
        for e in self.browser.events(self.session):
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                details = p.get("exceptionDetails", {})
                found.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                found.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                           for a in p.get("args", [])))
            elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                found.append(f"log: {p['entry'].get('text')} ({p['entry'].get('url', '')})")
        return found

    def screenshot(self, path: str | os.PathLike) -> None:
        data = self.browser.call("Page.captureScreenshot", {"format": "png"}, session=self.session)["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.browser.call("Target.closeTarget", {"targetId": self.target})


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    executable = find_chromium()
    if executable is None:
        print("chromium not found (apt-get install chromium, or set FUSEGRAPH_CHROMIUM)", file=sys.stderr)
        return 2
    with Browser(executable) as browser:
        page = browser.open(Path(argv[0]).resolve().as_uri(), width=1400, height=1100)
        errors = page.errors()
        if errors:
            print("\n".join(errors), file=sys.stderr)
            return 1
        page.screenshot(argv[1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
