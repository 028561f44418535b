"""The playground page in headless Chromium (selenium): pick steps, generate, see the image.

Needs `apt-get install -y chromium chromium-driver` and `pip install selenium`; skipped with a
reason when either is absent.
"""

from __future__ import annotations

import shutil
import tempfile

import pytest

from .test_server_support import make_app, serving

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs headless Chromium: apt-get install -y chromium chromium-driver",
)


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="halfstep-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_generate_from_the_page(tiny_bundle_dir, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app, engine = make_app(tiny_bundle_dir)
    with serving(app) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "Bundle tiny" in d.find_element(By.ID, "about").text)
        labels = [o.get_attribute("value") for o in
                  browser.find_elements(By.CSS_SELECTOR, "#label option")]
        assert labels == ["", *map(str, range(10))]
        slider = browser.find_element(By.ID, "steps")
        assert (slider.get_attribute("min"), slider.get_attribute("max")) == ("1", "8")
        browser.execute_script(  # a range input is set by script, as a drag would
            "const s = document.getElementById('steps'); s.value = 6;"
            "s.dispatchEvent(new Event('input'));")
        browser.find_element(By.CSS_SELECTOR, "#label option[value='3']").click()
        seed = browser.find_element(By.ID, "seed")
        seed.clear()
        seed.send_keys("42")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_elements(By.ID, "steps-used"))
        used = browser.find_element(By.ID, "steps-used").text
        latency = browser.find_element(By.ID, "latency").text
        width = wait.until(lambda d: d.execute_script(
            "const i = document.getElementById('image'); return i.complete && i.naturalWidth"))
    assert used.strip() == "steps used: 4"  # budget 6 -> the 4-step student
    assert latency.startswith("latency: ") and latency.strip().endswith(" ms")
    assert width == 28
    assert ("student", 4, 1) in engine.calls
