"""The playground's compare view in headless Chromium: every student and the teacher, side by side.

Needs `apt-get install -y chromium chromium-driver` and `pip install selenium`; skipped with a
reason when either is absent (the browser fixture comes from test_server_playground).
"""

from __future__ import annotations

import os
import tempfile

import pytest

from . import test_server_playground as playground
from .test_server_support import make_app, serving

CHROMIUM, DRIVER = playground.CHROMIUM, playground.DRIVER
browser = playground.browser  # the fixture: headless Chromium with a throwaway profile

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs headless Chromium: apt-get install -y chromium chromium-driver",
)

STUDENTS = [1, 2, 4, 8]  # the tiny bundle's students
TEACHER_DEFAULT = 16

CELLS_JS = """
return [...document.querySelectorAll('#compare-out .cell')].map((c) => {
  const img = c.querySelector('img');
  return {model: c.dataset.model, steps: +c.dataset.steps, state: c.className,
          text: c.innerText, width: img && img.complete ? img.naturalWidth : 0};
});"""


def open_compare(browser, url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: "Bundle tiny" in d.find_element(By.ID, "about").text)
    assert browser.find_element(By.ID, "generate").is_displayed()
    assert not browser.find_element(By.ID, "compare-run").is_displayed()
    browser.find_element(By.ID, "mode-compare").click()
    assert browser.find_element(By.ID, "compare-run").is_displayed()
    for single_only in ("generate", "model", "n", "deadline"):
        assert not browser.find_element(By.ID, single_only).is_displayed()
    assert browser.find_element(By.ID, "seed").is_displayed()
    assert browser.find_element(By.ID, "label").is_displayed()
    return wait


def screenshot_path(name: str) -> str:
    return os.path.join(os.environ.get("HALFSTEP_SCREENSHOT_DIR", tempfile.gettempdir()), name)


def test_compare_runs_every_model_in_step_order(tiny_bundle_dir, browser):
    from selenium.webdriver.common.by import By

    app, engine = make_app(tiny_bundle_dir)
    with serving(app) as url:
        browser.set_window_size(1000, 1200)
        wait = open_compare(browser, url)
        browser.find_element(By.CSS_SELECTOR, "#label option[value='3']").click()
        seed = browser.find_element(By.ID, "seed")
        seed.clear()
        seed.send_keys("7")
        browser.find_element(By.ID, "compare-run").click()
        wait.until(lambda d: d.find_element(By.ID, "compare-status").text.startswith("Done"))
        cells = wait.until(lambda d: (lambda cs: cs if all(c["width"] for c in cs) else None)(
            d.execute_script(CELLS_JS)))
        status = browser.find_element(By.ID, "compare-status").text
        progress = browser.execute_script(
            "const p = document.getElementById('compare-progress'); return [p.value, p.max];")
        browser.save_screenshot(screenshot_path("halfstep-compare.png"))
        # back to the single view: it still works
        browser.find_element(By.ID, "mode-single").click()
        assert browser.find_element(By.ID, "generate").is_displayed()
        assert not browser.find_element(By.ID, "compare-out").is_displayed()
    assert [(c["model"], c["steps"]) for c in cells] == \
        [("student", k) for k in STUDENTS] + [("teacher", TEACHER_DEFAULT)]
    for c in cells:
        assert c["width"] == 28, c
        assert "round trip: " in c["text"] and "server run: " in c["text"], c
        assert c["text"].count(" ms") == 2, c
    assert cells[-1]["text"].startswith(f"teacher, {TEACHER_DEFAULT} steps")
    assert cells[0]["text"].startswith("student, 1 step\n")
    # the ratio to the teacher (timing on a shared CPU can flip its direction: only its presence)
    assert all("than the teacher" in c["text"] for c in cells[:-1])
    assert "the baseline" in cells[-1]["text"]
    assert status == f"Done: seed 7, label 3, {len(cells)} of {len(cells)} ran."
    assert progress == [len(cells), len(cells)]
    # one request at a time, in step order, each student with exactly its steps
    assert engine.calls == [("student", k, 1) for k in STUDENTS] + [("teacher", TEACHER_DEFAULT, 1)]


def test_compare_errors_in_place_and_stop(tiny_bundle_dir, browser):
    from selenium.webdriver.common.by import By

    app, engine = make_app(tiny_bundle_dir)
    engine.fail_steps = {2}
    with serving(app) as url:
        wait = open_compare(browser, url)
        browser.find_element(By.ID, "compare-run").click()
        wait.until(lambda d: d.find_element(By.ID, "compare-status").text.startswith("Done"))
        cells = browser.execute_script(CELLS_JS)
        status = browser.find_element(By.ID, "compare-status").text
        # a failure stays in its cell; the others still ran
        assert [c["steps"] for c in cells] == [*STUDENTS, TEACHER_DEFAULT]
        failed = [c for c in cells if "failed" in c["state"]]
        assert [c["steps"] for c in failed] == [2]
        assert "HTTP 5" in failed[0]["text"] and not failed[0]["width"]
        assert all(c["width"] == 28 for c in cells if c["steps"] != 2)
        assert "1 failed" in status

        # stop while the first request is held in the engine: it and the rest do not show
        engine.fail_steps = set()
        with engine.held():
            browser.find_element(By.ID, "compare-run").click()
            assert engine.entered.wait(60)
            assert browser.find_element(By.ID, "compare-stop").is_enabled()
            assert not browser.find_element(By.ID, "compare-run").is_enabled()
            assert browser.find_element(By.ID, "compare-status").text.startswith("Running 1 of 5")
            browser.find_element(By.ID, "compare-stop").click()
            wait.until(lambda d: d.find_element(By.ID, "compare-status").text.startswith("Stopped"))
        stopped = browser.execute_script(CELLS_JS)
        assert browser.find_element(By.ID, "compare-run").is_enabled()
    assert "stopped" in stopped[0]["state"] and not stopped[0]["width"]
    assert all("skipped" in c["state"] and "not run" in c["text"] for c in stopped[1:])


def test_compare_fits_a_phone(tiny_bundle_dir, browser):
    from selenium.webdriver.common.by import By

    app, _ = make_app(tiny_bundle_dir)
    with serving(app) as url:
        browser.set_window_size(375, 740)
        browser.get(url + "/#compare")  # the address opens the compare view
        from selenium.webdriver.support.ui import WebDriverWait
        wait = WebDriverWait(browser, 120)
        wait.until(lambda d: "Bundle tiny" in d.find_element(By.ID, "about").text)
        assert browser.find_element(By.ID, "compare-run").is_displayed()
        browser.find_element(By.ID, "compare-run").click()
        wait.until(lambda d: d.find_element(By.ID, "compare-status").text.startswith("Done"))
        width = browser.execute_script("return window.innerWidth")
        columns = browser.execute_script(
            "return getComputedStyle(document.getElementById('compare-out'))"
            ".gridTemplateColumns")
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth")
        browser.execute_script("document.getElementById('compare-bar').scrollIntoView()")
        browser.save_screenshot(screenshot_path("halfstep-compare-phone.png"))
    assert width <= 500, "the window could not be made phone-sized"
    assert len(columns.split()) == 2  # two cells a row
    assert overflow <= 0
