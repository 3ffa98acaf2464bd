"""`moceir demo` driven as a person would, in headless Chromium (Debian's chromium + chromium-driver, Selenium):
upload, restore, compare, read the expert table, download, then a broken upload and a second restore.

Uses the app that tests/test_demo.py serves (one server for both files). Skips without Chromium, its driver,
Selenium or the demo extra, except under CI=true, where that fails and names scripts/install_optional_test_deps.sh.
MOCEIR_WRITE_DEMO_SCREENSHOT=1 saves the page after the first restore as docs/demo.png.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from test_demo import demo_url, noisy_crop, require  # noqa: F401 - demo_url is the shared app fixture

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "demo.png"
RESTORE_TIMEOUT = 180  # seconds; a 160x240 crop takes a few on two busy CPU cores


@pytest.fixture(scope="session")  # session: set up before the shared app, so a missing browser skips at once
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="session")
def browser(downloads):
    require("headless Chromium and Selenium", modules=("selenium",), programs=("chromium", "chromedriver"))
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    yield driver
    driver.quit()


def _wait(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By

    for remove in driver.find_elements(By.CSS_SELECTOR, "#restore-input button[aria-label='Remove Image']"):
        remove.click()
    file_input = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#restore-input input[type=file]"), 10,
                       "the upload field")[0]
    file_input.send_keys(str(path))
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#restore-input img"), 20, "the upload to show")


def _expert_rows(driver) -> list[str]:
    from selenium.webdriver.common.by import By

    rows = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#expert-table [role=row]")]
    return [r for r in rows if re.match(r"L\d+\b", r)]


def test_restore_in_the_browser(browser, downloads, demo_url, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(demo_url)
    _, noisy = noisy_crop(tmp_path, "noisy_cbsd68_0011.png", 160, 240)
    _upload(browser, noisy)
    browser.find_element(By.ID, "restore-button").click()
    link = _wait(lambda: browser.find_elements(By.CSS_SELECTOR, "#restore-download a[download]"), RESTORE_TIMEOUT,
                 "the restored PNG")[0]
    rows = _wait(lambda: len(_expert_rows(browser)) == 10 and _expert_rows(browser), 10, "10 expert rows")
    assert all(re.search(r"\bE[0-3]\b", r) for r in rows)
    slider_images = browser.find_elements(By.CSS_SELECTOR, "#restore-compare img")
    assert len(slider_images) == 2 and all(img.get_attribute("src") for img in slider_images)
    assert "of running all 4 experts" in browser.find_element(By.ID, "restore-summary").text
    if os.environ.get("MOCEIR_WRITE_DEMO_SCREENSHOT") == "1":
        height = browser.execute_script("return document.body.scrollHeight")
        browser.set_window_size(1400, min(height + 100, 2400))
        time.sleep(1)
        browser.save_screenshot(str(SCREENSHOT))
        browser.set_window_size(1400, 1000)

    link.click()
    png = _wait(lambda: [p for p in downloads.glob("*.png")], 30, "the download")[0]
    assert png.name == "noisy_cbsd68_0011_restored.png"
    assert Image.open(png).size == (240, 160)

    not_image = tmp_path / "holiday.png"
    not_image.write_text("a text file with an image's name")
    _upload(browser, not_image)
    browser.find_element(By.ID, "restore-button").click()
    toast = _wait(lambda: [t.text for t in browser.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")
                           if "holiday.png" in t.text], 60, "the error message")[0]
    assert "not an image" in toast

    _, second = noisy_crop(tmp_path, "second_try.png", 64, 96)
    _upload(browser, second)
    browser.find_element(By.ID, "restore-button").click()
    _wait(lambda: "second_try.png" in browser.find_element(By.ID, "restore-summary").text, RESTORE_TIMEOUT,
          "the second restore")
    assert [a.get_attribute("download") for a in browser.find_elements(By.CSS_SELECTOR, "#restore-download a")] \
        == ["second_try_restored.png"]
