"""The operator's console (``/_admin/``) from outside: its JSON API and event stream as a script
sees them, and its page as a person sees it, in Debian's Chromium (``tests/support/browser.py``).

The page is read through the DOM in one ``execute_script`` at a time (cards are redrawn as
updates arrive, so an element found in one call may be gone in the next), and driven by real
clicks.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By

from tests.support.harness import Server, wait_until

ADMIN = "/_admin/"


def state(url: str, **kwargs: Any) -> httpx.Response:
    """``GET /_admin/api/state`` of the server at ``url``."""
    kwargs.setdefault("timeout", 15)
    return httpx.get(f"{url}{ADMIN}api/state", **kwargs)


def act(url: str, path: str, csrf: str | None = None, **kwargs: Any) -> httpx.Response:
    """A console POST (``path`` under /_admin/api/), with the CSRF token unless None."""
    headers = dict(kwargs.pop("headers", {}))
    if csrf is not None:
        headers["X-CSRF-Token"] = csrf
    kwargs.setdefault("timeout", 15)
    return httpx.post(f"{url}{ADMIN}api/{path}", headers=headers, **kwargs)


def tunnel_row(document: dict[str, Any], token: str) -> dict[str, Any] | None:
    for row in document["tunnels"]:
        if row["token"] == token[:8] + "...":
            return row
    return None


@dataclass
class EventStream:
    """``GET /_admin/api/events`` read raw off a socket: every byte kept, events parsed."""

    raw: bytearray = field(default_factory=bytearray)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def feed(self, data: bytes) -> None:
        self.raw += data

    def parse(self) -> list[tuple[str, dict[str, Any]]]:
        """The events in what came so far (chunked coding undone)."""
        _head, _, body = bytes(self.raw).partition(b"\r\n\r\n")
        text = _dechunk(body).decode()
        events = []
        for block in text.split("\n\n"):
            name, data = "message", None
            for line in block.split("\n"):
                if line.startswith("event: "):
                    name = line[len("event: "):]
                elif line.startswith("data: "):
                    data = json.loads(line[len("data: "):])
            if data is not None:
                events.append((name, data))
        self.events = events
        return events


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0 or len(rest) < size + 2:
            out += rest[:size] if size else b""
            break
        out += rest[:size]
        body = rest[size + 2:]
    return bytes(out)


@contextlib.contextmanager
def event_stream(server: Server, headers: dict[str, str] | None = None
                 ) -> Iterator[tuple[socket.socket, EventStream]]:
    """An open event stream on a socket of its own; read it with :func:`read_for`."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        sock.sendall(f"GET {ADMIN}api/events HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        yield sock, EventStream()
    finally:
        sock.close()


def read_until(sock: socket.socket, stream: EventStream, predicate: Any, *, timeout: float,
               what: str) -> list[tuple[str, dict[str, Any]]]:
    """Read the stream until ``predicate(events)`` holds (every event so far), or fail."""
    deadline = time.monotonic() + timeout
    while True:
        events = stream.parse()
        if predicate(events):
            return events
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; "
                                 f"got {[name for name, _ in events]}")
        sock.settimeout(min(left, 1.0))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        if not data:
            raise AssertionError(f"the event stream ended while waiting for {what}")
        stream.feed(data)


# -- the page ---------------------------------------------------------------------------------

_READ_CARDS = """
const out = {};
for (const card of document.querySelectorAll('article.tunnel')) {
  out[card.dataset.token] = {
    id: card.dataset.id,
    blocked: card.classList.contains('is-blocked'),
    completed: Number(card.querySelector('.completed').textContent),
    errored: Number(card.querySelector('.errored').textContent),
    clients: [...card.querySelectorAll('.client')].map(
      (row) => ({protocol: row.dataset.protocol, transport: row.dataset.transport,
                 text: row.innerText})),
    text: card.innerText,
  };
}
return out;
"""

_READ_TABLE = """
return [...document.querySelectorAll(arguments[0] + ' tbody tr')].map(
  (row) => [...row.querySelectorAll('td')].map((cell) => cell.innerText));
"""


class ConsolePage:
    def __init__(self, driver: WebDriver, url: str, shots: Path) -> None:
        self.driver = driver
        self.url = url
        self.shots = shots
        shots.mkdir(parents=True, exist_ok=True)

    def open(self, *, live: bool = True) -> None:
        self.driver.get(f"{self.url}{ADMIN}")
        if live:
            wait_until(lambda: self.live_text() == "live", timeout=30, what="the console to go live")

    def live_text(self) -> str:
        return str(self.driver.execute_script("return document.getElementById('live').innerText"))

    def cards(self) -> dict[str, dict[str, Any]]:
        return dict(self.driver.execute_script(_READ_CARDS))

    def card(self, token: str) -> dict[str, Any] | None:
        return self.cards().get(token[:8] + "...")

    def wait_card(self, token: str, predicate: Any, what: str, timeout: float = 30) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            card = self.card(token)
            return card if card is not None and predicate(card) else None
        return wait_until(check, timeout=timeout, what=what)

    def table(self, selector: str) -> list[list[str]]:
        return [list(row) for row in self.driver.execute_script(_READ_TABLE, selector)]

    def body_text(self) -> str:
        return str(self.driver.execute_script("return document.body.innerText"))

    def dataset(self, name: str) -> str:
        return str(self.driver.execute_script(f"return document.body.dataset.{name} || ''"))

    def message(self) -> str:
        return str(self.driver.execute_script("return document.getElementById('message').innerText"))

    def click(self, token: str, action: str, *, confirm: bool = False) -> None:
        """Click the card's ``action`` button (``confirm``: a destructive one, which asks twice)."""
        selector = f'article.tunnel[data-token="{token[:8]}..."] button[data-action="{action}"]'
        self.press(selector, confirm=confirm)

    def press(self, selector: str, *, confirm: bool = False) -> None:
        """Click the element ``selector`` finds, scrolled to the middle of the window first (the
        sticky header must not be the one to get the click).

        ``confirm``: a destructive button, which a first click only arms, for a few seconds. The
        second click goes in the page itself, and only while the button is armed: on a machine
        slow enough to let the arming lapse, the button is armed again, never clicked once more
        in a state the test did not see."""
        if not confirm:
            wait_until(lambda: self._click(selector), timeout=10, what=f"a click on {selector}")
            return

        def armed_then_confirmed() -> bool:
            if not self._is_armed(selector):
                wait_until(lambda: self._click(selector), timeout=10, what=f"a click on {selector}")
                wait_until(lambda: self._is_armed(selector), timeout=10, what=f"{selector} armed")
            return bool(self.driver.execute_script(
                "const button = document.querySelector(arguments[0]);"
                "if (!button || !button.classList.contains('armed')) return false;"
                "button.click(); return true;", selector))

        wait_until(armed_then_confirmed, timeout=30, what=f"a confirmed click on {selector}")

    def _click(self, selector: str) -> bool:
        try:
            element = self.driver.find_element(By.CSS_SELECTOR, selector)
            self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
            element.click()
        except (StaleElementReferenceException, WebDriverException):
            return False  # redrawn under us, or covered for a moment: again
        return True

    def _is_armed(self, selector: str) -> bool:
        return bool(self.driver.execute_script(
            "const button = document.querySelector(arguments[0]);"
            "return !!button && button.classList.contains('armed');", selector))

    def screenshot(self, name: str) -> Path:
        """The whole page, not only the window: the window grows to the page's height for it."""
        path = self.shots / name
        size = self.driver.get_window_size()
        height = int(self.driver.execute_script("return document.documentElement.scrollHeight"))
        chrome = size["height"] - int(self.driver.execute_script("return window.innerHeight"))
        self.driver.set_window_size(size["width"], min(height + chrome, 6000))
        try:
            self.driver.save_screenshot(str(path))
        finally:
            self.driver.set_window_size(size["width"], size["height"])
        return path

    def source(self) -> str:
        return str(self.driver.page_source)
