"""The web page at / in a real headless Chromium (Debian's `chromium`, driven by Playwright), against the real
server: the session `server` fixture, which serves every released model.

One browser and one page for the whole module (starting Chromium costs seconds on 2 cores); each test leaves
the page usable for the next. Every request the page makes and every console message is recorded, and the last
tests check them all: only the server's own origin, no console error but the ones a test provoked on purpose.

    VISIONSERVE_SCREENSHOT_DIR=docs/img .venv/bin/python -m pytest tests/test_web.py -k screenshots   (make screenshots)
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from conftest import MODELS_DIR, start_server, stop_server
from web_samples import CLASSIFY_SAMPLES, SAMPLES_DIR, SCENE_SAMPLE, sample_images

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra: make install")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Quiet, offline-friendly launch: no background fetches (component updates, sync, QUIC probes) that would
# show up as requests the page never made.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # answers on a busy 2-core machine; waiting is for elements, never a fixed sleep
SCREENSHOT_DIR_VARIABLE = "VISIONSERVE_SCREENSHOT_DIR"
API_KEY = "web-page-test-key-0123456789"
SAMPLE_LABELS = {"ankle-boot.png": "Ankle boot", "pullover.png": "Pullover", "trouser.png": "Trouser",
                 "sneaker.png": "Sneaker"}


@dataclass
class PageRecord:
    """What the page did: every request's URL, console errors, uncaught exceptions."""

    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    expected_errors: list[re.Pattern] = field(default_factory=list)  # provoked on purpose by a test


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: `make test` installs it as root; otherwise run "
                    "`apt-get install chromium` as root", pytrace=False)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def record() -> PageRecord:
    return PageRecord()


@pytest.fixture(scope="module")
def page(browser, server_url, record):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("request", lambda request: record.requests.append(request.url))
    page.on("console", lambda message: message.type == "error" and record.console_errors.append(message.text))
    page.on("pageerror", lambda error: record.page_errors.append(str(error)))
    page.goto(server_url + "/")
    page.wait_for_selector("#models-result .model-card")
    yield page
    context.close()


def image_loaded(page, selector: str) -> bool:
    """Waits (no fixed sleep) until the image has decoded; wait_for_function would need eval, which the page's
    CSP refuses, so the wait is on the image's `complete` property and the size is read after."""
    image = page.locator(selector)
    sync_api.expect(image).to_have_js_property("complete", True, timeout=TIMEOUT_MS)
    return image.evaluate("img => img.naturalWidth > 0")


def sample_path(name: str) -> str:
    return str(SAMPLES_DIR / name)


def test_committed_samples_are_what_the_script_makes():
    for name, (data, _) in sample_images().items():
        assert (SAMPLES_DIR / name).read_bytes() == data, f"{name}: run .venv/bin/python tests/web_samples.py"


def test_page_docs_and_files_are_served_with_a_same_origin_policy(server_url):
    page = httpx.get(server_url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src" not in csp and "unsafe-inline" not in csp
    for hook in ("classify-file", "classify-run", "classify-result", "segment-file", "segment-run", "segment-result",
                 "generate-class", "generate-seed", "generate-run", "generate-result"):
        assert f'id="{hook}"' in page.text, hook
    docs = httpx.get(server_url + "/docs", timeout=10)
    assert docs.status_code == 200 and "default-src 'self'" in docs.headers["content-security-policy"]
    assert "googletagmanager" not in docs.text and "swagger-ui" in docs.text
    for path in ("/static/app.js", "/static/style.css", "/static_content/swagger-ui-bundle.js"):
        assert httpx.get(server_url + path, timeout=10).status_code == 200, path
    assert "http://" not in page.text and "https://" not in page.text, "the page names another origin"


def test_classify_a_test_png_names_its_class(page):
    page.set_input_files("#classify-file", sample_path("ankle-boot.png"))
    page.click("#classify-run")
    row = page.wait_for_selector("#classify-result .prediction")
    assert row.get_attribute("data-top-label") == "Ankle boot"
    header = page.inner_text("#classify-result .answer-header")
    assert re.search(r"cnn \S+ · \d+ ms", header), header  # the default model, its version, the latency
    assert len(page.query_selector_all("#classify-result .prediction .top-k li")) == 3


def test_similar_training_images_show_under_the_answer_and_a_digit_is_flagged(page):
    """The nearest training images (POST /similar) under each prediction, and the OOD flag as a visible warning."""
    import io

    from PIL import Image

    from export.evaluate_ood import digits_upscaled

    buffer = io.BytesIO()  # a handwritten digit, MNIST-like: flagged for all 1,000 measured (benchmarks/results/ood.md)
    Image.fromarray(digits_upscaled(1, seed=0)[0, 0]).save(buffer, format="PNG")
    page.select_option("#classify-model", "cnn")
    boot_png = Path(sample_path("ankle-boot.png")).read_bytes()  # Playwright takes paths or buffers, not both
    page.set_input_files("#classify-file", [{"name": "ankle-boot.png", "mimeType": "image/png", "buffer": boot_png},
                                            {"name": "digit.png", "mimeType": "image/png", "buffer": buffer.getvalue()}])
    page.click("#classify-run")
    sync_api.expect(page.locator("#classify-result .prediction .similar img")).to_have_count(16)
    boot, digit = page.query_selector_all("#classify-result .prediction")
    assert boot.get_attribute("data-ood") == "ok" and not boot.query_selector(".ood-warning")
    labels = [img.get_attribute("alt") for img in boot.query_selector_all(".similar img")]
    assert labels.count("Ankle boot") >= 6, labels
    assert digit.get_attribute("data-ood") == "flagged" and digit.query_selector(".ood-warning").is_visible()
    assert "Unlike the training images" in digit.inner_text()


def test_several_files_give_one_row_each_with_the_chosen_model(page):
    names = list(CLASSIFY_SAMPLES)
    page.select_option("#classify-model", "resnet")
    page.set_input_files("#classify-file", [sample_path(name) for name in names])
    page.click("#classify-run")
    sync_api.expect(page.locator("#classify-result .prediction")).to_have_count(4)
    rows = page.query_selector_all("#classify-result .prediction")
    assert [row.get_attribute("data-top-label") for row in rows] == [SAMPLE_LABELS[name] for name in names]
    assert page.inner_text("#classify-result .answer-header").startswith("resnet")
    page.select_option("#classify-model", "cnn")


def test_clicking_a_sample_classifies_it(page):
    page.click("#classify .sample[data-sample$='trouser.png']")
    page.wait_for_selector("#classify-result .prediction[data-top-label='Trouser']")


def test_an_invalid_file_shows_the_servers_message(page, server_url, record):
    not_an_image = b"these bytes are not an image"
    expected = httpx.post(server_url + "/classify", files=[("images", ("notes.png", not_an_image, "image/png"))],
                          timeout=30)
    assert expected.status_code >= 400
    record.expected_errors.append(re.compile(rf"status of {expected.status_code}\b"))
    page.set_input_files("#classify-file", {"name": "notes.png", "mimeType": "image/png", "buffer": not_an_image})
    page.click("#classify-run")
    error = page.wait_for_selector("#classify-result .error")
    assert error.inner_text() == expected.json()["error"]["message"]


def test_segment_a_two_item_scene_shows_the_overlay_and_both_items(page):
    page.set_input_files("#segment-file", sample_path(SCENE_SAMPLE))
    page.click("#segment-run")
    overlay = page.wait_for_selector("#segment-result img.overlay")
    assert image_loaded(page, "#segment-result img.overlay")
    assert overlay.get_attribute("src").startswith("blob:")
    legend = {item.get_attribute("data-label") for item in page.query_selector_all("#segment-result .legend li")}
    assert {"Bag", "Sandal"} <= legend, legend
    assert re.search(r"\d+\.\d% of the image", page.inner_text("#segment-result .legend"))
    link = page.query_selector("#segment-result a.download")
    assert link.get_attribute("download") == "mask.png" and link.get_attribute("href").startswith("blob:")


def generated_image(page, class_index: int, seed: int) -> str:
    """The grid's data: URL after a generate click (the bytes themselves, so two answers compare exactly)."""
    page.evaluate("() => document.querySelector('#generate-result').replaceChildren()")
    page.select_option("#generate-class", str(class_index))
    page.fill("#generate-seed", str(seed))
    page.click("#generate-run")
    return page.wait_for_selector("#generate-result img.grid").get_attribute("src")


def test_generate_is_the_same_for_a_seed_and_differs_for_another(page):
    first = generated_image(page, 3, 7)
    assert first.startswith("data:image/png;base64,")
    assert generated_image(page, 3, 7) == first
    assert generated_image(page, 3, 8) != first
    assert "Dress, seed 8" in page.inner_text("#generate-result figcaption")
    page.click("#generate-new-seed")
    assert page.input_value("#generate-seed") not in ("", "8")


def test_interpolation_strip_with_a_slider(page):
    page.fill("#interpolate-steps", "6")
    page.click("#interpolate-run")
    page.wait_for_selector("#interpolate-result img.strip")
    assert image_loaded(page, "#interpolate-result img.strip")
    slider = page.query_selector("#interpolate-slider")
    assert slider.get_attribute("max") == "5"
    slider.focus()
    page.keyboard.press("End")  # the slider works from the keyboard
    assert page.inner_text("#interpolate-result output") == "step 6 of 6"


def test_models_section_shows_each_cards_essentials(page, server_url):
    described = httpx.get(server_url + "/models", timeout=10).json()["models"]
    cards = {card.get_attribute("data-model"): card.inner_text() for card in page.query_selector_all(".model-card")}
    assert set(cards) == {model["name"] for model in described}
    for model in described:
        text = cards[model["name"]]
        assert model["task"] in text and model["version"] in text and model["sha256"][:12] in text
        assert f"{model['architecture']['parameters']:,}" in text
        for figure in model["release"]["figures"]:
            assert figure["text"] in text, (model["name"], figure["text"])
    # The embedding map `make embedding-map` drew for the default classifier, decoded by the browser.
    page.wait_for_function("document.querySelector('#embedding-map img').complete")
    assert page.eval_on_selector("#embedding-map img", "img => img.naturalWidth") > 0


def test_swagger_ui_at_docs_renders_our_routes_under_its_policy(page, server_url, record):
    docs = page.context.new_page()
    docs.on("request", lambda request: record.requests.append(request.url))
    docs.on("console", lambda message: message.type == "error" and record.console_errors.append(message.text))
    docs.on("pageerror", lambda error: record.page_errors.append(str(error)))
    try:
        docs.goto(server_url + "/docs")
        docs.wait_for_selector(".swagger-ui .opblock-summary-path[data-path='/classify']", timeout=TIMEOUT_MS)
    finally:
        docs.close()


def test_phone_width_has_no_horizontal_scroll(browser, server_url):
    context = browser.new_context(viewport={"width": 375, "height": 800}, is_mobile=True)
    try:
        phone = context.new_page()
        phone.goto(server_url + "/")
        phone.wait_for_selector("#models-result .model-card")
        assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    finally:
        context.close()


def test_screenshots_of_each_section(page, tmp_path):
    """Written to docs/img/ by `make screenshots`; elsewhere to a temporary folder (so the suite checks they work)."""
    out = Path(os.environ.get(SCREENSHOT_DIR_VARIABLE) or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    page.click("#classify .sample[data-sample$='ankle-boot.png']")
    page.wait_for_selector("#classify-result .prediction[data-top-label='Ankle boot']")
    page.evaluate("() => document.querySelector('#segment-result').replaceChildren()")
    page.click("#segment .sample")
    page.wait_for_selector("#segment-result img.overlay")
    assert image_loaded(page, "#segment-result img.overlay")
    generated_image(page, 3, 7)
    page.fill("#interpolate-from", "7")
    page.fill("#interpolate-to", "8")
    page.fill("#interpolate-steps", "8")
    page.click("#interpolate-run")
    page.wait_for_selector("#interpolate-result output:text('step 1 of 8')")
    assert image_loaded(page, "#interpolate-result img.strip")
    page.locator("#interpolate-slider").fill("3")
    for section in ("classify", "segment", "generate", "models"):
        path = out / f"web-{section}.png"
        page.locator(f"#{section}").screenshot(path=str(path), animations="disabled")
        assert path.stat().st_size > 1000, path


@pytest.fixture(scope="module")
def key_server(tmp_path_factory):
    """A server that needs an API key, with one classifier only (a quick start)."""
    models = tmp_path_factory.mktemp("key-models")
    shutil.copytree(MODELS_DIR / "cnn", models / "cnn")
    running = start_server(tmp_path_factory.mktemp("key-server") / "server.log",
                           {"VISIONSERVE_MODELS_DIR": str(models), "VISIONSERVE_API_KEY": API_KEY,
                            "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"})
    yield running
    stop_server(running)


def test_with_an_api_key_the_page_asks_for_it_and_keeps_it_in_session_storage(browser, key_server):
    for path in ("/", "/static/app.js", "/static/samples/ankle-boot.png"):  # the page itself needs no key
        assert httpx.get(key_server.url + path, timeout=10).status_code == 200, path
    assert httpx.get(key_server.url + "/models", timeout=10).status_code == 401
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(key_server.url + "/")
        page.wait_for_selector("#api-key-form:not([hidden])")
        assert "needs an API key (HTTP 401" in page.inner_text("#api-key-message")
        assert page.inner_text("#models-result .error").startswith("Unauthorized: this server needs an API key")
        page.fill("#api-key", "not-the-key")
        page.press("#api-key", "Enter")  # the form works from the keyboard
        page.wait_for_selector("#api-key-message:text('the API key is not valid')")
        page.fill("#api-key", API_KEY)
        page.click("#api-key-save")
        page.wait_for_selector("#models-result .model-card[data-model='cnn']")
        assert page.inner_text("#api-key-message") == "The key works."
        assert page.evaluate("() => sessionStorage.getItem('visionserve-api-key')") == API_KEY
        page.click("#classify .sample[data-sample$='ankle-boot.png']")
        page.wait_for_selector("#classify-result .prediction[data-top-label='Ankle boot']")
    finally:
        context.close()


# These two take `page` so that, run alone, they still judge a page that was opened (the module's other tests add
# to the same record when they run first).
def test_every_request_went_to_the_servers_own_origin(page, record, server_url):
    assert record.requests, "no request recorded"
    elsewhere = [url for url in record.requests
                 if not (url.startswith(server_url + "/") or url.startswith(("blob:", "data:")))]
    assert not elsewhere, elsewhere


def test_no_console_errors_but_the_provoked_ones(page, record):
    assert not record.page_errors, record.page_errors
    unexpected = [text for text in record.console_errors
                  if not any(pattern.search(text) for pattern in record.expected_errors)]
    assert not unexpected, unexpected
