"""The app's page in a real browser: headless Chromium driven by Selenium against the live server.

Uploads the bundled example, types its expression, presses Run and checks what a user sees in a
screenshot of the whole page taken right after the run: the overlay, all ten candidates with the
chosen one framed in green (each shown whole, not cropped), DeRIS's own answer without the
"chosen" legend, the decision in words, a scores table whose headers do not break inside a word;
and what they download (the JSON, equal to the Python API's `Result.to_json()`). A Run without an
image (or without an expression) shows one line, which goes away once the input is given, and the
page keeps working. Uses the distribution's `chromium` and `chromedriver` (Debian: apt-get install
chromium chromium-driver; .ci/run installs them); nothing is downloaded. Skipped, saying what is
missing, where they or selenium are not installed.

Artefacts: the screenshots of the whole page go to $DERIS_RERANK_TEST_ARTEFACTS (else the test's
tmp folder), their paths printed. docs/app.md's screenshot is made here too:
    DERIS_RERANK_SCREENSHOT=docs/app.png python -m pytest tests/test_app_browser.py
"""
import base64
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
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError as exc:
    pytest.skip(f"the browser tests need selenium (pip install -e \".[test]\"): {exc}", allow_module_level=True)

import cv2
import numpy as np

from app_helpers import EXAMPLE, assert_same_answer, live_server
from deris_rerank.app.server import create_server
from deris_rerank.app.service import SegmentService
from deris_rerank.app.ui import AppCallbacks, candidate_tiles, deris_answer_picture
from deris_rerank.pipeline import DEFAULT_MODEL, Pipeline
from deris_rerank.visualize import SELECTED_FRAME_COLOR, decision_overlay

TEXT = "the biggest cross"  # the bundled example's expression
WAIT_S = 120  # the longest wait for anything in the page: a bound, not a speed test
# A short window: the screenshots take the whole page, whose lower pictures lie farther below the
# window than Chromium's lazy loading reaches (they stayed blank before the page asked for them eagerly)
WINDOW = (1280, 500)
# Most a shown picture may differ from the one the server made, mean absolute difference per
# channel (0-255) after resizing it to the size shown: the browser's scaling differs from
# OpenCV's (0.8 to 3.3 measured here); a cropped picture, or one partly covered by a gallery's
# label or by the "chosen" legend, gave 16 to 37.
SHOWN_TOLERANCE = 8.0
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
    box.send_keys(Keys.CONTROL, "a")  # as a user clears it (WebElement.clear() leaves the page's value as it was)
    box.send_keys(Keys.DELETE)
    box.send_keys(text)
    before = markdown_text(driver, "status")
    driver.find_element(By.CSS_SELECTOR, "#run").click()

    def new_status(d):
        status = markdown_text(d, "status")
        return status if status not in ("", before) else None

    return wait_for(driver, new_status, "the status line")


def page_screenshot(driver) -> np.ndarray:
    """The whole page (beyond the window), as uint8 RGB [H, W, 3] in CSS pixels, where it is now."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    bgr = cv2.imdecode(np.frombuffer(base64.b64decode(shot["data"]), np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def save_screenshot(pixels: np.ndarray, name: str, tmp_path, readme_copy: bool = False) -> Path:
    """`pixels` as PNG `name` in $DERIS_RERANK_TEST_ARTEFACTS (else `tmp_path`), and, with
    readme_copy and $DERIS_RERANK_SCREENSHOT naming a file, docs/app.md's copy there (256 colours, to
    keep it small)."""
    from PIL import Image

    folder = Path(os.environ.get("DERIS_RERANK_TEST_ARTEFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.fromarray(pixels).save(path)
    print(f"screenshot of the page: {path}")
    readme_path = os.environ.get("DERIS_RERANK_SCREENSHOT")
    if readme_copy and readme_path:
        Image.fromarray(pixels).quantize(256).save(readme_path, optimize=True)
        print(f"docs/app.md's screenshot: {readme_path}")
    return path


def shown_pictures(driver, selector):
    """(caption, [x, y, w, h] on the page) of each loaded image under `selector`, in order: the box
    its picture fills on the page (inside the element, as object-fit: contain places it)."""
    return driver.execute_script("""
        return [...document.querySelectorAll(arguments[0] + " img")].map((img) => {
          const r = img.getBoundingClientRect(), fit = getComputedStyle(img).objectFit;
          let w = r.width, h = r.height;
          if (fit === "contain" || fit === "scale-down") {
            const s = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
            w = img.naturalWidth * s; h = img.naturalHeight * s;
          }
          return [img.title || img.alt, [r.left + scrollX + (r.width - w) / 2, r.top + scrollY + (r.height - h) / 2, w, h]];
        });""", selector)


def shown_difference(screenshot: np.ndarray, box, picture: np.ndarray) -> float:
    """Mean absolute difference between the page's pixels in `box` and `picture` resized to it."""
    x, y, w, h = (int(round(v)) for v in box)
    assert w >= 16 and h >= 16, f"shown at {w}x{h} px only"
    shown = screenshot[y:y + h, x:x + w].astype(np.float64)
    assert shown.shape[:2] == (h, w), f"shown partly outside the page: {box}"
    return float(np.abs(shown - cv2.resize(picture, (w, h), interpolation=cv2.INTER_AREA)).mean())


def words_broken_across_lines(driver, selector):
    """The words (hyphenated ones whole) of the elements under `selector` that the page splits over two lines."""
    return driver.execute_script("""
        const broken = [];
        for (const cell of document.querySelectorAll(arguments[0])) {
          const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
          for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            for (const word of node.data.matchAll(/\\S+/g)) {
              const range = document.createRange();
              range.setStart(node, word.index);
              range.setEnd(node, word.index + word[0].length);
              if (new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size > 1) broken.push(word[0]);
            }
          }
        }
        return broken;""", selector)


def test_the_page_segments_the_example_as_the_python_api_does(browser, server_url, pipe, expected, downloads, tmp_path):
    open_page(browser, server_url)
    upload_example(browser)
    assert run(browser, TEXT) == "1 expression answered."

    # everything a run shows is loaded right away, without scrolling to it
    overlays = wait_for(browser, lambda d: loaded_images(d, "#overlays"), "the overlay")
    assert [image.get_attribute("alt") for image in overlays] == [f"1. {TEXT}"]
    candidates = len(expected.scores)
    assert candidates == 10
    wait_for(browser, lambda d: len(loaded_images(d, "#candidates")) == candidates, "the candidates")
    wait_for(browser, lambda d: loaded_images(d, "#answers"), "DeRIS's own answer")
    decision = markdown_text(browser, "decisions")
    assert f"1. {TEXT}" in decision
    words = "Switched from Query-0" if expected.switched else "Kept Query-0"
    assert words in decision and f"p_fail {expected.p_fail:.3f}" in decision
    assert f"tau {pipe.gate.rule.tau:.2f}" in decision
    headers = [cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#decisions th")]
    assert headers[:4] == ["rank", "slot", "DeRIS score", "re-ranker score"], headers
    assert words_broken_across_lines(browser, "#decisions th, #decisions td") == []

    screenshot = page_screenshot(browser)
    save_screenshot(screenshot, "app.png", tmp_path, readme_copy=True)
    # each picture is shown whole: the page's pixels equal the picture the server made
    chosen_overlay = decision_overlay(expected.image, expected.mask, expected.default_mask if expected.switched else None)
    ((_, box),) = shown_pictures(browser, "#overlays")
    assert shown_difference(screenshot, box, chosen_overlay) < SHOWN_TOLERANCE
    assert markdown_text(browser, "candidates-heading").endswith(f"1. {TEXT}: tiles 1-{candidates}.")
    tiles = candidate_tiles(expected)
    shown_tiles = [box for _, box in shown_pictures(browser, "#candidates")]
    assert len(shown_tiles) == len(tiles) == candidates
    for rank, (box, tile) in enumerate(zip(shown_tiles, tiles)):
        assert shown_difference(screenshot, box, tile) < SHOWN_TOLERANCE, f"candidate #{rank}"
    x, y, w, h = (int(round(v)) for v in shown_tiles[expected.selected_rank])
    frame = screenshot[y:y + h, x:x + 3].reshape(-1, 3).astype(int)  # its left edge, as shown
    assert (np.abs(frame - SELECTED_FRAME_COLOR).max(axis=1) < 60).mean() > 0.9, "the chosen candidate's green frame"
    # DeRIS's own answer, whole, and without the "chosen" legend: its top-left corner shows the image itself
    ((_, (x, y, w, h)),) = shown_pictures(browser, "#answers")
    assert shown_difference(screenshot, (x, y, w, h), deris_answer_picture(expected)) < SHOWN_TOLERANCE
    corner = (int(round(x)), int(round(y)), w / 3, h / 8)
    scale = expected.image.shape[1] / w
    image_corner = expected.image[: int(round(h / 8 * scale)), : int(round(w / 3 * scale))]
    assert not expected.deris_mask[: image_corner.shape[0], : image_corner.shape[1]].any()  # nothing tinted there
    assert shown_difference(screenshot, corner, image_corner) < SHOWN_TOLERANCE

    browser.find_element(By.CSS_SELECTOR, "#downloads a[download='01.json']").click()
    saved = downloads / "01.json"
    wait_for(browser, lambda d: saved.is_file() and not list(downloads.glob("*.crdownload")), "the downloaded JSON")
    assert_same_answer(json.loads(saved.read_text()), expected.to_json())


def test_an_error_shows_one_line_until_the_input_is_given_and_the_page_keeps_working(browser, server_url, tmp_path):
    open_page(browser, server_url)
    status = run(browser, TEXT)
    assert status.startswith("Error: no image") and "\n" not in status
    assert not browser.find_elements(By.CSS_SELECTOR, "#overlays img")

    upload_example(browser)
    wait_for(browser, lambda d: markdown_text(d, "status") == "", "the error going away after the upload")
    save_screenshot(page_screenshot(browser), "after-upload.png", tmp_path)
    status = run(browser, "")
    assert status.startswith("Error: no expression")
    browser.find_element(By.CSS_SELECTOR, "#expressions textarea").send_keys("the")
    wait_for(browser, lambda d: markdown_text(d, "status") == "", "the error going away once an expression is typed")

    assert run(browser, TEXT) == "1 expression answered."
    assert wait_for(browser, lambda d: loaded_images(d, "#overlays"), "the overlay")
