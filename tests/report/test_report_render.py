"""The report of a real (small) bench study renders in a browser: headless Chromium, driven by Selenium.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``make test`` installs them where apt-get is
available); elsewhere this test is skipped with that reason. Selenium is pointed at ``/usr/bin/chromedriver``
so it never resolves (or downloads) a driver itself: Selenium Manager is made to fail if it is ever called.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from taskbalance.cli import app

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT_DIR_ENV = "TASKBALANCE_REPORT_SCREENSHOT"  # optional: also copy the screenshot there


def _browser_or_skip() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        pytest.skip(
            f"headless Chromium not installed ({', '.join(missing)} missing): install the Debian packages "
            f"chromium and chromium-driver (`make test` does where apt-get is available)"
        )
    pytest.importorskip("selenium", reason="selenium is in the test extra: pip install 'taskbalance[test]'")


def _driver(profile: Path, monkeypatch: pytest.MonkeyPatch):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common import selenium_manager

    def no_network(*args, **kwargs):
        raise AssertionError("Selenium Manager was called: it could try to download a driver")

    monkeypatch.setattr(selenium_manager.SeleniumManager, "binary_paths", no_network)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-quic",
        f"--user-data-dir={profile}", "--window-size=1280,900",
    ):  # fmt: skip
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def test_bench_report_renders_in_headless_chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _browser_or_skip()
    from selenium.webdriver.common.by import By

    study = tmp_path / "study"
    result = CliRunner().invoke(
        app,
        ["bench", "--suite", "quick", "--methods", "ew,pcgrad", "--seeds", "2", "--epochs", "2",
         "--workers", "1", "--out", str(study)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Report: " in result.output and (study / "report.html").exists()
    pngs = sorted(p.name for p in (study / "plots").glob("*.png"))
    assert len(pngs) == 6, pngs

    driver = _driver(tmp_path / "profile", monkeypatch)
    try:
        driver.get((study / "report.html").resolve().as_uri())
        assert driver.title == "taskbalance report — tiny"
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == 6
        for image in images:
            loaded = driver.execute_script(
                "const i = arguments[0]; return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0",
                image,
            )
            assert loaded, f"image {image.get_attribute('alt')!r} did not load"
            assert image.get_attribute("src").startswith("data:image/png;base64,")
        tables = driver.find_elements(By.TAG_NAME, "table")
        assert len(tables) >= 2
        rows = [r.text for r in tables[0].find_elements(By.CSS_SELECTOR, "tbody tr")]
        assert [r.split()[0] for r in rows] == ["single-task", "ew", "pcgrad"]
        headers = tables[0].find_element(By.TAG_NAME, "thead").text
        assert "Δm% ↓" in headers and "ms/step" in headers
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1280, min(height + 120, 8000))
        screenshot = tmp_path / "report.png"
        assert driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
    assert screenshot.read_bytes().startswith(b"\x89PNG")
    target = os.environ.get(SCREENSHOT_DIR_ENV)
    if target:
        shutil.copy(screenshot, Path(target) / "report-screenshot.png")
