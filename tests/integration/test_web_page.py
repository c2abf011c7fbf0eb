"""The try-it page, in a real headless Chromium driven by Playwright, against a real server."""

import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.core import explain
from tests.helpers import ROOT, bentoml_server, encode_image

pytestmark = [pytest.mark.slow]
CHROMIUM = "/usr/bin/chromium"
# Screenshots are test output for people to look at, never committed (.gitignore: test-output/).
SCREENSHOTS = ROOT / "test-output"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: run 'make test' (it installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def animal_png(tmp_path_factory):
    from training.data.sources import load_animals

    path = tmp_path_factory.mktemp("upload") / "held_out_animal.png"
    path.write_bytes(encode_image(load_animals().pixels[-1], "PNG"))
    return path


def test_uploading_an_image_shows_the_label_the_api_gives(browser, server, animal_png):
    expected = httpx.post(
        f"{server}/classify", files={"image": (animal_png.name, animal_png.read_bytes())}
    ).json()
    page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone-sized screen
    page.goto(server)
    page.wait_for_selector("text=version")
    page.set_input_files("#file", str(animal_png))
    title = page.wait_for_selector(".card .top-label")
    assert title.inner_text().startswith(expected["label"] + " ")
    bars = page.query_selector_all(".card .bar")
    assert len(bars) == 3
    assert bars[0].query_selector(".label span").inner_text() == expected["top_k"][0]["label"]
    assert expected["model"]["version"] in page.inner_text("#model")
    assert "image(s) in" in page.inner_text("#status")
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "web-page-phone.png"), full_page=True)
    page.close()


def test_several_images_use_the_batch_endpoint(browser, server, animal_png, tmp_path):
    second = tmp_path / "copy.png"
    shutil.copy(animal_png, second)
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    with page.expect_response("**/classify_batch*") as response:
        page.goto(server)
        page.set_input_files("#file", [str(animal_png), str(second)])
    assert response.value.status == 200
    page.wait_for_function("document.querySelectorAll('.card').length === 2")
    page.screenshot(path=str(SCREENSHOTS / "web-page.png"), full_page=True)
    page.close()


def test_the_page_follows_the_servers_batch_limit(browser, tiny_run, animal_png, tmp_path):
    copies = [tmp_path / f"copy-{n}.png" for n in range(3)]
    for copy in copies:
        shutil.copy(animal_png, copy)
    with bentoml_server(tiny_run["folder"], workers=1, MAX_BATCH_IMAGES="2") as url:
        assert httpx.get(f"{url}/model").json()["max_batch_images"] == 2
        page = browser.new_page()
        page.goto(url)
        page.wait_for_function("document.getElementById('max-images').textContent === '2'")
        with page.expect_response("**/classify_batch*") as response:
            page.set_input_files("#file", [str(copy) for copy in copies])
        assert response.value.status == 200
        page.wait_for_function("document.querySelectorAll('.card').length === 2")
        assert "Up to 2 images" in page.text_content("#error")
        page.close()


def test_a_non_image_shows_the_api_error_message(browser, server, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not an image")
    page = browser.new_page()
    page.goto(server)
    page.set_input_files("#file", str(text_file))
    error = page.wait_for_selector("#error", state="visible")
    message = error.inner_text()
    assert "not an image" in message and "not_an_image" in message and "415" in message
    assert not page.query_selector_all(".card")
    page.close()


def test_the_openapi_page_moved_to_docs(server):
    assert "swagger" in httpx.get(f"{server}/docs").text.lower()
    assert httpx.get(f"{server}/model").json()["labels"]


def test_an_unknown_image_is_said_to_be_none_of_the_known_classes(
    browser, server, outlier_image, tmp_path
):
    upload = tmp_path / "unlike-anything.png"
    upload.write_bytes(outlier_image)
    expected = httpx.post(f"{server}/classify", files={"image": ("x", outlier_image)}).json()
    assert expected["label"] == "unknown"
    page = browser.new_page()
    page.goto(server)
    page.set_input_files("#file", str(upload))
    verdict = page.wait_for_selector(".card.unknown .verdict")
    text = verdict.inner_text()
    assert "none of the known classes" in text
    assert f"Closest: {expected['top_k'][0]['label']}" in text
    assert page.inner_text(".card .top-label") == "Unknown"
    page.screenshot(path=str(SCREENSHOTS / "web-page-unknown.png"), full_page=True)
    page.close()


def test_the_map_lies_over_the_image_when_toggled(browser, server, animal_png):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(server)
    page.wait_for_selector("#explain-control", state="visible")  # the model has a map
    with page.expect_response("**/classify?explain=1") as response:
        page.set_input_files("#file", str(animal_png))
    cam = np.asarray(response.value.json()["cam"])
    page.wait_for_selector(".card .top-label")
    canvas = page.wait_for_selector(".card canvas.cam", state="attached")
    page.wait_for_function("document.querySelector('.card canvas.cam').width > 0")
    assert not canvas.is_visible()  # off until asked for
    page.check("#explain")
    assert canvas.is_visible()
    assert canvas.bounding_box() == page.query_selector(".card img").bounding_box()
    drawn = page.evaluate(
        """() => {
            const canvas = document.querySelector('.card canvas.cam');
            const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
            return {width: canvas.width, height: canvas.height,
                    alpha: Array.from(data.data.filter((_, i) => i % 4 === 3))};
        }"""
    )
    assert (drawn["width"], drawn["height"]) == (28, 28)  # the image's own proportions
    alpha = np.asarray(drawn["alpha"], dtype=float).reshape(28, 28)
    # As opaque as the map is hot (60% at its peak), upsampled as the service's overlays are.
    expected = 255 * explain.MAX_OPACITY * explain.upsample(cam, (28, 28))
    assert np.abs(alpha - expected).max() <= 3
    assert alpha.max() >= 0.8 * 255 * explain.MAX_OPACITY
    page.screenshot(path=str(SCREENSHOTS / "web-page-map.png"), full_page=True)
    page.uncheck("#explain")
    assert not canvas.is_visible()
    page.close()
