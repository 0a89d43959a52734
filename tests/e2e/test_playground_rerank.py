"""The playground's rerank mode in a real headless Chromium against a real server: switch the
mode, pick a rerank model (only rerank models are offered), add images and a text, and rank
them by the rerank route's relevance scores."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import API_KEY
from tests.e2e.test_playground import browser, pictures  # noqa: F401 (fixtures)
from tests.e2e.test_rerank_api import server  # noqa: F401 (this module's server: keys, ledger)

pytestmark = [pytest.mark.slow, pytest.mark.network]


def options(driver) -> list[str]:
    """The model choices, read in one script (the list is rebuilt when the mode changes)."""
    return driver.execute_script(
        "return [...document.getElementById('model').options].map((o) => o.value)"
    )


def test_playground_reranks_items_in_a_real_browser(server, browser, pictures, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(server.url + "/")
    key = browser.find_element(By.ID, "key")
    key.send_keys(API_KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait.until(lambda d: len(options(d)) >= 4)

    Select(browser.find_element(By.ID, "mode")).select_by_value("rerank")
    wait.until(lambda d: set(options(d)) == {"qwen3-vl-rerank", "gte-rerank-v2", "qwen3-rerank"})
    Select(browser.find_element(By.ID, "model")).select_by_value("qwen3-vl-rerank")
    assert not browser.find_element(By.ID, "dimension").is_enabled()

    files = browser.find_element(By.ID, "files")
    files.send_keys("\n".join(str(pictures[n]) for n in ("coffee.png", "cat.jpg", "rocket.jpg")))
    browser.find_element(By.ID, "texts").send_keys("a violin on a table")
    browser.find_element(By.ID, "add-texts").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#items .card")) == 4)

    browser.find_element(By.ID, "query-text").send_keys("a photo of a cat")
    browser.find_element(By.ID, "rank").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Reranked 4 items"))
    cards = browser.find_elements(By.CSS_SELECTOR, "#items .card")
    ranked = [
        (c.get_attribute("data-name"), float(c.find_element(By.CLASS_NAME, "score").text))
        for c in cards
    ]
    assert ranked[0][0] == "cat.jpg", ranked
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert browser.save_screenshot(str(tmp_path / "playground-rerank.png"))

    # back to embedding similarity: embedding models again, dimensions enabled
    Select(browser.find_element(By.ID, "mode")).select_by_value("embed")
    wait.until(lambda d: "tongyi-embedding-vision-plus" in options(d))
    assert browser.find_element(By.ID, "dimension").is_enabled()
    errors = [
        e
        for e in browser.get_log("browser")
        if e["level"] == "SEVERE" and not ("/models" in e["message"] and "401" in e["message"])
    ]
    assert not errors, errors
