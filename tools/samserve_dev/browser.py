"""The web page in a real browser (Debian's chromium driven by Playwright), for the browser tests and the browser
benchmark: launching chromium headless, loading an image into the page, clicking in image coordinates, and reading
what the page drew (its canvases) and what it exposes (``window.samserveApp``)."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

import samserve

CHROMIUM = "/usr/bin/chromium"
WEB_STATIC = Path(samserve.__file__).with_name("web_static")
"""The built page (`make web`), served by the gateway at `/`."""
DEMO_SCENE = Path(__file__).resolve().parents[2] / "web" / "demo.png"
"""The page's demo scene: held-out scene :data:`DEMO_SCENE_INDEX` of the scene generator (web/demo_scene.py)."""
DEMO_SCENE_INDEX = 56
DEMO_SCENE_SIZE = (288, 384)
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run")
"""Headless, no GPU, nothing contacted but the page's own origin."""
ENCODE_TIMEOUT_MS = 120_000
"""Embedding an image (the encoder) on a busy 2-core machine, plus the decoder download."""


@contextlib.contextmanager
def launch_chromium(executable: str = CHROMIUM) -> Iterator[Any]:
    """A headless chromium (Playwright's Browser) until exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=list(CHROMIUM_ARGS))
        try:
            yield browser
        finally:
            browser.close()


def wait_state(page: Any, *states: str, timeout_ms: float = ENCODE_TIMEOUT_MS) -> str:
    """Wait until the page's ``body[data-state]`` is one of ``states``; an ``error`` state fails at once."""
    page.wait_for_function("(states) => states.includes(document.body.dataset.state) || "
                           "document.body.dataset.state === 'error'", arg=list(states), timeout=timeout_ms)
    state = page.evaluate("document.body.dataset.state")
    assert state in states, f"page state {state}: {page.text_content('#status')}"
    return str(state)


def upload(page: Any, path: Path = DEMO_SCENE) -> dict:
    """Upload an image through the page's file input; wait until it is embedded; its id and geometry."""
    page.set_input_files("#file", str(path))
    wait_state(page, "ready")
    return dict(page.evaluate("window.samserveApp.image()"))


def counters(page: Any) -> dict:
    return dict(page.evaluate("window.samserveApp.counters()"))


def screen_point(page: Any, x: float, y: float) -> tuple[float, float]:
    """Page coordinates of image pixel coordinates (x, y) on the displayed image."""
    box = page.locator("#overlay-layer").bounding_box()
    image = page.evaluate("window.samserveApp.image()")
    return box["x"] + x * box["width"] / image["width"], box["y"] + y * box["height"] / image["height"]


def click_image(page: Any, x: float, y: float, button: str = "left") -> None:
    """Click at image coordinates (x, y) and wait until the page has decoded and drawn the new prompt."""
    before = counters(page)["commits"]
    page.mouse.click(*screen_point(page, x, y), button=button)
    page.wait_for_function("(n) => window.samserveApp.counters().commits > n", arg=before)
    wait_state(page, "ready")


def canvas_pixels(page: Any, selector: str) -> np.ndarray:
    """H x W x 4 uint8 RGBA of a canvas (its own pixel size: the image's)."""
    data = page.evaluate("""(selector) => {
        const canvas = document.querySelector(selector);
        const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
        let binary = '';
        const bytes = pixels.data;
        for (let i = 0; i < bytes.length; i += 0x8000) {
            binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
        }
        return {width: canvas.width, height: canvas.height, data: btoa(binary)};
    }""", selector)
    flat = np.frombuffer(base64.b64decode(data["data"]), dtype=np.uint8)
    return flat.reshape(data["height"], data["width"], 4)


def drawn_mask(page: Any) -> np.ndarray:
    """H x W bool: the pixels the page painted on its mask layer (the selected mask)."""
    return canvas_pixels(page, "#mask-layer")[..., 3] > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0
