"""A real browser for the end-to-end tests: Debian's ``chromium``, driven through ``chromium-driver``
with selenium. Nothing here downloads a browser: both binaries are the system's.

    with chromium(tmp_path, trust=[certs.cert_pem]) as browser:
        results = load_page(browser, url, tmp_path / "page.png")

The browser runs headless as the tests do (root, no display): no sandbox, no GPU, no QUIC, and
none of Chromium's background traffic (this machine's network is closed), with a fresh profile
in the test's directory. A test certificate is trusted by the hash of its public key
(``--ignore-certificate-errors-spki-list``), which Chromium honours only with its own
``--user-data-dir``: the browser still checks everything else of the TLS connection, and a
certificate other than the one named is refused as usual.
"""

from __future__ import annotations

import base64
import hashlib
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver

from tests.support.harness import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
HEADLESS_AS_ROOT = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1000,700",
)


def unavailable() -> str | None:
    """Why the browser tests cannot run here, or None."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (scripts/setup installs chromium chromium-driver)"
    return None


NEEDS_CHROMIUM = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")


def spki_sha256(cert_pem: Path) -> str:
    """base64 SHA-256 of the first certificate's SubjectPublicKeyInfo, as Chromium's flag takes it."""
    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@contextmanager
def chromium(directory: Path, *, trust: Sequence[Path] = (),
             arguments: Sequence[str] = ()) -> Iterator[WebDriver]:
    """A headless Chromium with a new profile under ``directory``, quit on the way out;
    ``arguments`` are more command-line switches (``--host-resolver-rules=...``, say)."""
    directory.mkdir(parents=True, exist_ok=True)
    profile = directory / "chromium-profile"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (*HEADLESS_AS_ROOT, f"--user-data-dir={profile}", *arguments):
        options.add_argument(argument)
    if trust:
        pins = ",".join(spki_sha256(cert) for cert in trust)
        options.add_argument(f"--ignore-certificate-errors-spki-list={pins}")
    service = Service(CHROMEDRIVER, log_output=str(directory / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


def load_page(driver: WebDriver, url: str, screenshot: Path, *, timeout: float = 60) -> dict[str, Any]:
    """Open the test app's page (tests/support/browser_page) at ``url``, wait for its checks to
    settle, save a screenshot, and return its ``window.results``."""
    driver.get(url)
    try:
        return wait_until(lambda: _settled(driver), timeout=timeout, what="the page's checks")
    finally:
        driver.save_screenshot(str(screenshot))


def _settled(driver: WebDriver) -> dict[str, Any] | None:
    results = driver.execute_script("return window.results || null")
    return results if results and results.get("done") else None
