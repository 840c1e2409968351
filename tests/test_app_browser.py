"""The app's page in a real browser: headless Chromium driven by Selenium against the live server.

Uploads the bundled example, types its expression, presses Run and checks what a user sees (the
overlay, the decision in words) and what they download (the JSON, equal to the Python API's
`Result.to_json()`); a Run without an image shows one line and the page keeps working. Uses the
distribution's `chromium` and `chromedriver` (Debian: apt-get install chromium chromium-driver;
.ci/run installs them); nothing is downloaded. Skipped, saying what is missing, where they or
selenium are not installed.

Artefacts: the page's screenshot goes to $DERIS_RERANK_TEST_ARTEFACTS (else the test's tmp
folder), its path printed. docs/app.md's screenshot is made here too:
    DERIS_RERANK_SCREENSHOT=docs/app.png python -m pytest tests/test_app_browser.py
"""
import json
import os
import shutil
from pathlib import Path

import pytest

try:
    import gradio  # noqa: F401
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as exc:  # the [app] extra is not installed
    pytest.skip(f"the app's tests need the [app] extra (gradio, fastapi, uvicorn): {exc}", allow_module_level=True)
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as exc:
    pytest.skip(f"the browser tests need selenium (pip install -e \".[test]\"): {exc}", allow_module_level=True)

from app_helpers import EXAMPLE, assert_same_answer, live_server
from deris_rerank.app.server import create_server
from deris_rerank.app.service import SegmentService
from deris_rerank.app.ui import AppCallbacks
from deris_rerank.pipeline import DEFAULT_MODEL, Pipeline

TEXT = "the biggest cross"  # the bundled example's expression
WAIT_S = 120  # the longest wait for anything in the page: a bound, not a speed test
WINDOW = (1280, 1600)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").is_file(),
                       reason=f"embedded default model not found in {DEFAULT_MODEL}"),
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="the browser tests need the distribution's chromium and chromedriver on PATH "
                              f"(Debian: apt-get install chromium chromium-driver); missing: "
                              f"{', '.join(n for n, p in (('chromium', CHROMIUM), ('chromedriver', CHROMEDRIVER)) if not p)}"),
]


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(device="cpu")


@pytest.fixture(scope="module")
def server_url(pipe, tmp_path_factory):
    """The whole server (API + page) on the embedded default, under uvicorn on 127.0.0.1."""
    service = SegmentService(pipe)
    with live_server(create_server(service, callbacks=AppCallbacks(service, tmp_path_factory.mktemp("browser-out")))) as url:
        yield url


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads):
    """Headless Chromium through the distribution's chromedriver (given explicitly, so Selenium
    Manager looks nothing up), a fixed window, downloads into `downloads`."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --no-sandbox: as root (containers, CI) Chromium does not start without it
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def expected(pipe):
    """The Python API's answer for the example (the service runs the gate at its own tau, as here)."""
    return pipe(EXAMPLE, [TEXT])[0]


def open_page(driver, url):
    """Load the page and wait until its Run button is there."""
    driver.get(url + "/")
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#run"), "the page's Run button")


def wait_for(driver, condition, what):
    """condition(driver)'s first truthy value, waiting up to WAIT_S seconds (elements that are not
    there yet, or that the page replaced while being read, count as not yet)."""
    waiting = WebDriverWait(driver, WAIT_S, poll_frequency=0.2,
                            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
    return waiting.until(condition, f"{what} did not appear in {WAIT_S} s")


def loaded_images(driver, selector):
    """The images under `selector` that the browser has loaded and decoded (an empty list if none)."""
    images = driver.find_elements(By.CSS_SELECTOR, f"{selector} img")
    ready = [image for image in images
             if driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image)]
    return ready if ready and len(ready) == len(images) else []


def upload_example(driver):
    """Give the example to the image input and wait until the page shows it (uploaded to the server)."""
    driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(EXAMPLE))
    wait_for(driver, lambda d: loaded_images(d, "#image"), "the uploaded image's preview")


def markdown_text(driver, element_id):
    """The visible text of a Markdown component (without Gradio's progress indicator around it)."""
    return driver.find_element(By.CSS_SELECTOR, f'#{element_id} [data-testid="markdown"]').text.strip()


def run(driver, text):
    """Type `text` as the expressions, press Run, and return the new status line once it shows."""
    box = driver.find_element(By.CSS_SELECTOR, "#expressions textarea")
    box.clear()
    box.send_keys(text)
    before = markdown_text(driver, "status")
    driver.find_element(By.CSS_SELECTOR, "#run").click()

    def new_status(d):
        status = markdown_text(d, "status")
        return status if status not in ("", before) else None

    return wait_for(driver, new_status, "the status line")


def save_screenshot(driver, tmp_path) -> Path:
    """The page as a PNG in $DERIS_RERANK_TEST_ARTEFACTS (else `tmp_path`), and, when
    $DERIS_RERANK_SCREENSHOT names a file, the app page's copy there (256 colours, to keep it small)."""
    from io import BytesIO

    from PIL import Image

    folder = Path(os.environ.get("DERIS_RERANK_TEST_ARTEFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    png = driver.get_screenshot_as_png()
    path = folder / "app.png"
    path.write_bytes(png)
    print(f"screenshot of the page: {path}")
    readme_copy = os.environ.get("DERIS_RERANK_SCREENSHOT")
    if readme_copy:
        Image.open(BytesIO(png)).convert("RGB").quantize(256).save(readme_copy, optimize=True)
        print(f"the app page's screenshot: {readme_copy}")
    return path


def test_the_page_segments_the_example_as_the_python_api_does(browser, server_url, pipe, expected, downloads, tmp_path):
    open_page(browser, server_url)
    upload_example(browser)
    assert run(browser, TEXT) == "1 expression answered."

    overlays = wait_for(browser, lambda d: loaded_images(d, "#overlays"), "the overlay")
    assert [image.get_attribute("alt") for image in overlays] == [f"1. {TEXT}"]
    decision = markdown_text(browser, "decisions")
    assert f"1. {TEXT}" in decision
    words = "Switched from Query-0" if expected.switched else "Kept Query-0"
    assert words in decision and f"p_fail {expected.p_fail:.3f}" in decision
    assert f"tau {pipe.gate.rule.tau:.2f}" in decision
    assert save_screenshot(browser, tmp_path).stat().st_size > 0

    browser.find_element(By.CSS_SELECTOR, "#downloads a[download='01.json']").click()
    saved = downloads / "01.json"
    wait_for(browser, lambda d: saved.is_file() and not list(downloads.glob("*.crdownload")), "the downloaded JSON")
    assert_same_answer(json.loads(saved.read_text()), expected.to_json())


def test_a_run_without_an_image_shows_one_line_and_the_page_keeps_working(browser, server_url):
    open_page(browser, server_url)
    status = run(browser, TEXT)
    assert status.startswith("Error: no image") and "\n" not in status
    assert not browser.find_elements(By.CSS_SELECTOR, "#overlays img")

    upload_example(browser)
    assert run(browser, TEXT) == "1 expression answered."
    assert wait_for(browser, lambda d: loaded_images(d, "#overlays"), "the overlay")
