"""The playground at ``/`` in a real headless Chromium (Debian's, driven over WebDriver) against a
real server with API keys: add three images, query by text and by image, check the ranking, and
keep a screenshot of the result."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import API_KEY
from tests.media_util import image_bytes

pytestmark = [pytest.mark.slow, pytest.mark.network]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("CI"):
            pytest.fail("chromium/chromedriver missing: scripts/install-chromium installs them")
        pytest.skip("chromium/chromedriver not installed (run scripts/install-chromium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def pictures(tmp_path: Path) -> dict[str, Path]:
    from skimage import data

    folder = tmp_path / "pictures"
    folder.mkdir()
    out = {}
    for name, pixels, fmt in (
        ("coffee.png", data.coffee(), "PNG"),
        ("cat.jpg", data.chelsea(), "JPEG"),
        ("rocket.jpg", data.rocket(), "JPEG"),
        ("query-cat.png", data.chelsea()[40:280, 60:360], "PNG"),
    ):
        path = folder / name
        path.write_bytes(image_bytes(pixels, fmt))
        out[name] = path
    return out


def test_playground_ranks_images_in_a_real_browser(server, browser, pictures, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 120)
    browser.get(server.url + "/")
    assert "mmembed playground" in browser.title

    # the server has API keys: the page lists models only once the key is given
    key = browser.find_element(By.ID, "key")
    key.send_keys(API_KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) >= 4)
    Select(browser.find_element(By.ID, "model")).select_by_value("tongyi-embedding-vision-plus")
    Select(browser.find_element(By.ID, "dimension")).select_by_value("512")
    assert browser.execute_script("return localStorage.getItem('mmembed.key')") == API_KEY
    early = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert early == []  # the page asked nothing of the API before the key was typed

    files = browser.find_element(By.ID, "files")
    files.send_keys("\n".join(str(pictures[n]) for n in ("coffee.png", "cat.jpg", "rocket.jpg")))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#items .card")) == 3)
    thumbs = browser.find_elements(By.CSS_SELECTOR, "#items .card img")
    wait.until(
        lambda d: all(d.execute_script("return arguments[0].naturalWidth", t) > 0 for t in thumbs)
    )

    def ranking() -> list[tuple[str, float]]:
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Ranked"))
        cards = browser.find_elements(By.CSS_SELECTOR, "#items .card")
        return [
            (c.get_attribute("data-name"), float(c.find_element(By.CLASS_NAME, "score").text))
            for c in cards
        ]

    # a text query
    browser.find_element(By.ID, "query-text").send_keys("a photo of a cat")
    browser.find_element(By.ID, "rank").click()
    ranked = ranking()
    assert ranked[0][0] == "cat.jpg", ranked
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[1]
    first = browser.find_element(By.CSS_SELECTOR, "#items .card")
    assert "best" in first.get_attribute("class")
    assert first.find_element(By.CLASS_NAME, "rank").text == "#1"
    shot = tmp_path / "playground.png"
    assert browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")

    # an image query (a crop of the cat photo) also puts the cat first
    browser.execute_script("document.getElementById('status').textContent = ''")
    browser.find_element(By.ID, "query-file").send_keys(str(pictures["query-cat.png"]))
    wait.until(lambda d: d.find_element(By.ID, "query-image").is_displayed())
    browser.find_element(By.ID, "rank").click()
    ranked = ranking()
    assert ranked[0][0] == "cat.jpg", ranked
    assert browser.save_screenshot(str(tmp_path / "playground-image-query.png"))
    dimension = Select(browser.find_element(By.ID, "dimension")).first_selected_option
    assert dimension.text == "512"  # the user's choice survives the model list reloading
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def severe(browser) -> list[dict]:
    return [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_playground_errors_stay_beside_their_items(server, browser, pictures, tmp_path):
    """No refused request on load; the model list holds what the key may use; a bad file gets
    its own message, named, and the rest are ranked; an error clears old scores; adding items
    clears an old error."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from tests.e2e.conftest import V1_ONLY_KEY

    wait = WebDriverWait(browser, 120)
    browser.get(server.url + "/")
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Enter the API key"))
    assert severe(browser) == []  # no /models call without the key, so no 401 in the console
    assert Select(browser.find_element(By.ID, "model")).options == []

    def use_key(secret: str) -> Select:
        key = browser.find_element(By.ID, "key")
        key.clear()
        key.send_keys(secret)
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "models"))
        return Select(browser.find_element(By.ID, "model"))

    # a key limited to one name: the list holds only that one, selected
    models = use_key(V1_ONLY_KEY)
    assert [o.get_attribute("value") for o in models.options] == ["multimodal-embedding-v1"]
    assert models.first_selected_option.get_attribute("value") == "multimodal-embedding-v1"
    models = use_key(API_KEY)
    assert len(models.options) >= 4
    models.select_by_value("tongyi-embedding-vision-plus")

    broken = tmp_path / "broken.png"
    broken.write_bytes(pictures["coffee.png"].read_bytes()[:200])  # a PNG cut short
    files = [pictures["cat.jpg"], broken, pictures["coffee.png"], pictures["rocket.jpg"]]
    browser.find_element(By.ID, "files").send_keys("\n".join(map(str, files)))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#items .card")) == 4)
    browser.find_element(By.ID, "query-text").send_keys("a photo of a cat")
    browser.find_element(By.ID, "rank").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "Ranked 3 of 4 items"))
    status = browser.find_element(By.ID, "status")
    assert "1 failed" in status.text and status.get_attribute("class") == "error"
    cards = browser.find_elements(By.CSS_SELECTOR, "#items .card")
    by_name = {c.get_attribute("data-name"): c for c in cards}
    assert cards[0].get_attribute("data-name") == "cat.jpg"  # the others were ranked
    bad = by_name["broken.png"]
    error = bad.find_element(By.CLASS_NAME, "item-error").text
    assert error.startswith("InvalidParameter.DataInspection: broken.png"), error
    assert "contents[0]" not in error
    assert bad.find_element(By.CLASS_NAME, "score").text == ""
    assert bad.find_elements(By.CLASS_NAME, "rank") == []  # no place in the ranking
    assert all(
        c.find_element(By.CLASS_NAME, "score").text for n, c in by_name.items() if n != "broken.png"
    )
    shot = tmp_path / "playground-errors.png"
    assert browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")

    # a query that fails clears the old scores and says it was the query
    browser.find_element(By.ID, "query-file").send_keys(str(broken))
    wait.until(lambda d: d.find_element(By.ID, "query-clear").is_displayed())
    browser.find_element(By.ID, "rank").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "the query"))
    assert status.get_attribute("class") == "error"
    scores = [s.text for s in browser.find_elements(By.CSS_SELECTOR, "#items .card .score")]
    assert scores == ["", "", "", ""], scores
    assert browser.find_elements(By.CSS_SELECTOR, "#items .card .rank") == []

    # adding items clears the stale message
    browser.find_element(By.ID, "texts").send_keys("a cup of coffee")
    browser.find_element(By.ID, "add-texts").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#items .card")) == 5)
    assert status.text == "" and status.get_attribute("class") != "error"
    # only the refused embedding requests (400) are in the console: nothing on load
    logged = severe(browser)
    assert all("400" in e["message"] and "multimodal-embedding" in e["message"] for e in logged), (
        logged
    )
