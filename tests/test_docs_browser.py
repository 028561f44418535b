"""/docs (Swagger UI) and /redoc render in headless Chromium from the server's own assets,
with no network beyond the server (skipped with a reason when Chromium is absent)."""

from __future__ import annotations

import pytest

from .test_server_playground import browser  # noqa: F401 (fixture)
from .test_server_support import make_app, serving

pytest.importorskip("selenium.webdriver", reason="pip install selenium")


def _external_requests(driver, server_url: str) -> list[str]:
    """Every resource the page loaded from anywhere but the server itself."""
    names = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)")
    return [n for n in names if not n.startswith(server_url) and not n.startswith("data:")]


def test_swagger_ui_and_redoc_render_offline(tiny_bundle_dir, browser):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app, _ = make_app(tiny_bundle_dir)
    with serving(app) as url:
        wait = WebDriverWait(browser, 60)
        browser.get(url + "/docs")
        ops = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
        paths = {op.text.replace("\u200b", "") for op in ops}
        assert "/generate" in paths and "/v1/models" in paths
        assert _external_requests(browser, url) == []
        browser.get(url + "/redoc")
        wait.until(lambda d: "/generate" in d.find_element(By.TAG_NAME, "body").text)
        assert _external_requests(browser, url) == []
