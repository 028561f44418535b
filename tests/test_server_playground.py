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
NO_CHROMIUM = "needs headless Chromium: apt-get install -y chromium chromium-driver"
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason=NO_CHROMIUM)


@pytest.fixture
def browser():
    """Headless Chromium; skips the test (in any module that uses it) when it is absent."""
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM and DRIVER):
        pytest.skip(NO_CHROMIUM)

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


def set_slider(browser, value: int) -> str:
    """Set the step slider as a drag would and return what it snapped to."""
    return browser.execute_script(
        "const s = document.getElementById('steps'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('input')); return s.value;", value)


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
        # the slider stops only at students (1, 2, 4, 8), in the direction it moved
        assert set_slider(browser, 6) == "8"
        assert set_slider(browser, 5) == "4"
        assert browser.find_element(By.ID, "steps-value").text == "4"
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
    assert used.strip() == "steps used: 4"
    assert latency.startswith("latency: ") and latency.strip().endswith(" ms")
    assert width == 28
    assert ("student", 4, 1) in engine.calls


def test_teacher_steps_deadline_errors_and_grids(tiny_bundle_dir, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    app, engine = make_app(tiny_bundle_dir)
    with serving(app) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "Bundle tiny" in d.find_element(By.ID, "about").text)
        Select(browser.find_element(By.ID, "model")).select_by_value("teacher")
        teacher = browser.find_element(By.ID, "teacher-steps")
        assert teacher.is_displayed() and not browser.find_element(By.ID, "steps").is_displayed()
        assert (teacher.get_attribute("value"), teacher.get_attribute("max")) == ("16", "64")
        teacher.clear()
        teacher.send_keys("3")
        n = browser.find_element(By.ID, "n")
        n.clear()
        n.send_keys("4")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_elements(By.ID, "grid"))
        caption = browser.find_element(By.CSS_SELECTOR, "#out figcaption").text
        assert "steps used: 3" in caption and "latency: " in caption and "grid: 2x2" in caption
        assert ("teacher", 3, 4) in engine.calls
        # deadline_ms goes with the request: 0 is out of bounds, so the server answers 422
        browser.find_element(By.ID, "deadline").send_keys("0")
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: "HTTP 422" in d.find_element(By.ID, "status").text)
        assert "deadline_ms" in browser.find_element(By.ID, "status").text
        assert not browser.find_elements(By.ID, "image")  # the old image is gone


def test_page_fits_a_phone(tiny_bundle_dir, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app, _ = make_app(tiny_bundle_dir)
    with serving(app) as url:
        browser.set_window_size(375, 740)
        browser.get(url + "/")
        WebDriverWait(browser, 60).until(
            lambda d: "Bundle tiny" in d.find_element(By.ID, "about").text)
        width = browser.execute_script("return window.innerWidth")
        columns = browser.execute_script(
            "return getComputedStyle(document.getElementById('form')).gridTemplateColumns")
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth")
    assert width <= 500, "the window could not be made phone-sized"
    assert len(columns.split()) == 1  # labels above their inputs
    assert overflow <= 0


def test_bundle_picker_switches_bundles(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from halfstep.server.app import create_app
    from halfstep.server.settings import Settings

    from .conftest import build_tiny_bundle
    from .test_server_support import metric_value

    first = build_tiny_bundle(tmp_path / "a", name="alpha")
    second = build_tiny_bundle(tmp_path / "b", steps=(1, 2), name="beta", seed=50)
    app = create_app(Settings(bundles=(str(first), str(second)), backend="torch", max_batch=8))
    with serving(app) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "Bundle alpha" in d.find_element(By.ID, "about").text)
        picker = browser.find_element(By.ID, "bundle")
        assert picker.is_displayed()
        assert [o.text for o in picker.find_elements(By.TAG_NAME, "option")] == ["alpha", "beta"]
        browser.find_element(By.CSS_SELECTOR, "#bundle option[value='beta']").click()
        wait.until(lambda d: "Bundle beta" in d.find_element(By.ID, "about").text)
        assert browser.find_element(By.ID, "steps").get_attribute("max") == "2"
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: d.find_elements(By.ID, "steps-used"))
        used = browser.find_element(By.ID, "steps-used").text
        text = app.state.halfstep.metrics.render().decode()
    assert used.strip() == "steps used: 2"
    assert metric_value(text, "halfstep_images_generated_total",
                        'bundle="beta",model="student"') == 1
    assert metric_value(text, "halfstep_images_generated_total",
                        'bundle="alpha",model="student"') == 0


def test_one_bundle_hides_the_picker(tiny_bundle_dir, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app, _ = make_app(tiny_bundle_dir)
    with serving(app) as url:
        browser.get(url + "/")
        WebDriverWait(browser, 60).until(
            lambda d: "Bundle tiny" in d.find_element(By.ID, "about").text)
        assert not browser.find_element(By.ID, "bundle").is_displayed()
