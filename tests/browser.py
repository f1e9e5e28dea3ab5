"""A real headless Chromium for the report's browser tests: Debian's chromium and chromedriver, driven by selenium.

The page is opened with no host name or IP address resolvable, so anything it fetches from the network fails:
a test that finds all its images and no console errors has also shown that the report is self-contained.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait

MISSING = "{} is not installed: `make test` installs it (apt-get install chromium chromium-driver)"


def _tool(name: str) -> str:
    """The tool's path; failing (never skipping), since a skipped browser test would pass unseen."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(MISSING.format(name), pytrace=False)
    return path


@contextmanager
def open_page(path: Path, width: int = 1400, height: int = 1000) -> Iterator[webdriver.Chrome]:
    """A headless Chromium showing the file at ``path``, loaded (readyState complete), with no network."""
    chromium, chromedriver = _tool("chromium"), _tool("chromedriver")
    with tempfile.TemporaryDirectory(prefix="mcs-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium  # given with the driver below: Selenium Manager would download both
        for flag in ("--headless=new", "--no-sandbox",  # the tests run as root, where the sandbox cannot start
                     "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions", "--no-first-run",
                     f"--user-data-dir={profile}", f"--window-size={width},{height}",
                     "--host-resolver-rules=MAP * ~NOTFOUND"):  # no host, nor IP address, resolves: no network
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
        try:
            driver.get(path.resolve().as_uri())
            WebDriverWait(driver, 10).until(lambda d: d.execute_script("return document.readyState") == "complete")
            yield driver
        finally:
            driver.quit()


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """The console's SEVERE messages since the last call: script errors, console.error, resources that failed."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def images_loaded(driver: webdriver.Chrome) -> list[tuple[str, int]]:
    """Each ``<img>`` with a src: its alt (else the src's first 60 characters) and naturalWidth, 0 if it did not load.

    An image with no src yet (the report's lightbox, before a click) is left out: it has nothing to load."""
    WebDriverWait(driver, 10).until(lambda d: d.execute_script("return document.readyState") == "complete")
    images = driver.execute_script("return Array.from(document.images).filter(i => i.hasAttribute('src')).map("
                                   "i => [i.alt || (i.getAttribute('src') || '').slice(0, 60), i.naturalWidth]);")
    return [(name, int(width)) for name, width in images]
