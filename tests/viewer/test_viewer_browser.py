"""``gigaseg view`` end to end in a real headless browser (Chromium driven by Playwright).

An 8192 x 8192 scene (image and two masks, written by gigaseg's writers) is served and looked
at: the page loads, tiles render at two zoom levels and the screenshot's pixels are the
image's (without the mask) and the blend with the class colours (with it), the legend lists
the classes with their exact areas, the cursor shows the pixel and its class, and paths outside
the given files are refused.

Needs Playwright for Python and Chromium from the system's packages (``apt-get install
chromium``; Playwright's own browser download is not used). Without them the tests skip, unless
``GIGASEG_REQUIRE_BROWSER=1`` (what CI sets), which makes a missing browser a failure.
``GIGASEG_VIEWER_SCREENSHOT=docs/viewer.png`` also saves the README's screenshot.
"""

from __future__ import annotations

import http.client
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gigaseg.geometry import Detections, Window
from gigaseg.io.detections import write_detections_geojson
from gigaseg.io.writers import write_tiled_tiff
from gigaseg.viewer import ViewerServer

from .scene import CLASSES, PALETTE, write_scene

CHROMIUM = os.environ.get("GIGASEG_CHROMIUM", "/usr/bin/chromium")
REQUIRED = os.environ.get("GIGASEG_REQUIRE_BROWSER") == "1"
SCREENSHOT = os.environ.get("GIGASEG_VIEWER_SCREENSHOT")
#: headless Chromium on a closed network: no sandbox (root in CI), no GPU, no background connections
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SIZE = 8192
VIEWPORT = {"width": 1280, "height": 800}
#: tolerance of a screenshot's colour against the scene's (JPEG tiles, resampling, rounding)
TOLERANCE = 7


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -e '.[dev]')"
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = browser_missing()
    if missing:
        if REQUIRED:
            pytest.fail(f"GIGASEG_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(f"{missing}: the end-to-end viewer test needs both (GIGASEG_REQUIRE_BROWSER=1 makes this fail)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # Playwright gives every launch a fresh temporary profile (--user-data-dir)
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def scene(browser, tmp_path_factory):
    return write_scene(tmp_path_factory.mktemp("viewer_scene"), SIZE)


@pytest.fixture(scope="module")
def server(scene):
    with ViewerServer(scene.image, scene.masks).start() as running:
        yield running


@pytest.fixture(scope="module")
def page(browser, server):
    page = open_page(browser, server)
    yield page
    page.close()


def open_page(browser, server):
    """The server's page, loaded and idle; ``page.requested`` and ``page.problems`` collect its URLs and errors."""
    page = browser.new_page(viewport=VIEWPORT)
    page.requested = []
    page.problems = []
    page.on("request", lambda request: page.requested.append(request.url))
    page.on("pageerror", lambda error: page.problems.append(f"page error: {error}"))
    page.on("console", lambda m: m.type == "error" and page.problems.append(f"console: {m.text}"))
    page.goto(server.url)
    wait_idle(page)
    return page


# -- driving the page -----------------------------------------------------------------------------


def wait_idle(page) -> None:
    """Wait until every shown layer has its tiles for the current view and has drawn them."""
    page.wait_for_function("() => window.gigaseg && window.gigaseg.isIdle()", timeout=60_000)
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
    page.wait_for_function("() => window.gigaseg.isIdle()", timeout=60_000)


def show(page, mask: str | None, opacity: int = 50) -> None:
    page.check(f"#mask-{mask or 'none'}")
    page.locator("#opacity").fill(str(opacity))
    wait_idle(page)


def go_home(page) -> None:
    page.evaluate("() => gigaseg.viewer.viewport.goHome(true)")
    wait_idle(page)


def zoom_to(page, x: float, y: float, image_zoom: float) -> None:
    """Centre image pixel (x, y) at ``image_zoom`` screen pixels per image pixel."""
    page.evaluate(
        """([x, y, zoom]) => {
            const viewer = gigaseg.viewer, image = viewer.world.getItemAt(0);
            viewer.viewport.zoomTo(image.imageToViewportZoom(zoom), null, true);
            viewer.viewport.panTo(image.imageToViewportCoordinates(x, y), true);
        }""",
        [x, y, image_zoom],
    )
    wait_idle(page)


def to_screen(page, x: float, y: float) -> tuple[float, float]:
    """Where image pixel coordinates (x, y) are on the page."""
    return tuple(
        page.evaluate(
            """([x, y]) => {
                const viewer = gigaseg.viewer;
                const p = viewer.world.getItemAt(0).imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
                const box = viewer.element.getBoundingClientRect();
                return [p.x + box.left, p.y + box.top];
            }""",
            [x, y],
        )
    )


def screenshot(page) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(np.float64)


def colour_at(shot: np.ndarray, point: tuple[float, float], half: int = 2) -> np.ndarray:
    """Mean colour of the (2 half + 1)^2 screen pixels around ``point``."""
    x, y = (int(round(v)) for v in point)
    return shot[y - half : y + half + 1, x - half : x + half + 1].reshape(-1, 3).mean(axis=0)


def viewer_box(page) -> tuple[slice, slice]:
    """The viewer's area on the screenshot, less its buttons and navigator."""
    box = page.evaluate("() => { const r = gigaseg.viewer.element.getBoundingClientRect(); return [r.left, r.top] }")
    left, top = int(box[0]), int(box[1])
    return slice(top + 40, VIEWPORT["height"] - 160), slice(left, VIEWPORT["width"] - 200)


def uniform_points(labels: np.ndarray, radius: int, step: int = 256, around=None) -> dict[int, tuple[int, int]]:
    """One pixel per class whose square of ``radius`` around it holds only that class.

    Searched on a grid of ``step`` pixels, over the scene or within ``around = (x, y, reach)``.
    """
    x0, y0, reach = around or (labels.shape[1] // 2, labels.shape[0] // 2, labels.shape[0])
    found = {}
    margin = max(step, radius)
    for y in range(max(margin, y0 - reach), min(labels.shape[0] - margin, y0 + reach), step):
        for x in range(max(margin, x0 - reach), min(labels.shape[1] - margin, x0 + reach), step):
            label = int(labels[y, x])
            if label not in found and (labels[y - radius : y + radius + 1, x - radius : x + radius + 1] == label).all():
                found[label] = (x, y)
    return found


def image_colour(scene, x: int, y: int, half: int) -> np.ndarray:
    """The scene's mean colour around pixel (x, y), from the pixels it was written from."""
    return scene.image_pixels(Window(y - half, x - half, 2 * half + 1, 2 * half + 1)).reshape(-1, 3).mean(axis=0)


def blend(image: np.ndarray, label: int, opacity: float) -> np.ndarray:
    return (1 - opacity) * image + opacity * PALETTE[label].astype(np.float64)


# -- the tests ----------------------------------------------------------------------------------------


def test_page_loads_and_tiles_render_at_two_zoom_levels(page, server, scene):
    assert page.inner_text("#size").startswith(f"{SIZE} × {SIZE} px")
    assert page.inner_text("#title") == "image.tif"
    for zoom in ("home", "full resolution"):
        if zoom == "home":
            go_home(page)
            points = uniform_points(scene.labels[0], 80, around=(SIZE // 2, SIZE // 2, 2400))  # clear of the controls
            assert sorted(points) == [0, 1, 2, 3]
            half = 26  # a screen pixel is about 10 image pixels: 5 screen pixels cover 51
        else:
            cx, cy = points[0]
            zoom_to(page, cx, cy, 1.0)  # one screen pixel per image pixel: full-resolution tiles
            points = uniform_points(scene.labels[0], 12, step=8, around=(cx, cy, 300))
            half = 2
        assert len(points) >= 2, zoom
        show(page, None)
        alone = screenshot(page)
        show(page, "m0", 50)
        masked = screenshot(page)
        rows, cols = viewer_box(page)
        changed = (np.abs(alone - masked)[rows, cols].max(axis=2) > 10).mean()
        assert changed > 0.5, (zoom, changed)
        checked = 0
        for label, (x, y) in points.items():
            where = to_screen(page, x + 0.5, y + 0.5)
            if not (cols.start + 5 < where[0] < cols.stop - 5 and rows.start + 5 < where[1] < rows.stop - 5):
                continue  # not in view at this zoom
            expected = image_colour(scene, x, y, half)
            np.testing.assert_allclose(colour_at(alone, where), expected, atol=TOLERANCE, err_msg=f"{zoom} {label}")
            np.testing.assert_allclose(
                colour_at(masked, where), blend(expected, label, 0.5), atol=TOLERANCE, err_msg=f"{zoom} {label}"
            )
            checked += 1
        assert checked == len(points) if zoom == "home" else checked >= 2, (zoom, checked)
    # the tiles came from two (and more) levels of the pyramids, full resolution (level 13) among them
    for layer in ("image", "m0"):
        levels = {level for (name, level), count in server.tile_requests.items() if name == layer and count}
        assert 13 in levels and len(levels) >= 2, (layer, levels)
    assert not page.problems


def test_the_legend_lists_the_classes_with_their_exact_areas(page, scene):
    page.wait_for_function(
        "() => Object.keys(gigaseg.areas).length === 2 && Object.values(gigaseg.areas).every(a => a.done)",
        timeout=60_000,
    )
    for mask in ("m0", "m1"):
        show(page, mask)
        rows = page.evaluate(
            """() => [...document.querySelectorAll('#legend tbody tr')].map(tr => [
                getComputedStyle(tr.querySelector('.swatch')).backgroundColor,
                ...[...tr.cells].slice(1).map(td => td.textContent)])"""
        )
        counts = scene.counts(int(mask[1]))
        expected = [
            [f"rgb({r}, {g}, {b})", name, f"{count:,}", f"{100 * count / SIZE**2:.2f}%"]
            for (r, g, b), name, count in zip(PALETTE.tolist(), CLASSES, counts.tolist())
        ]
        assert rows == expected
        assert page.inner_text("#legend-state") == ""
    assert counts.sum() == SIZE**2 and not page.problems


def test_masks_toggle_and_the_opacity_slider_blends(page, scene):
    a, b = scene.labels
    differ = (a != b) & (np.roll(a != b, 12, axis=0)) & (np.roll(a != b, -12, axis=1))
    ys, xs = np.nonzero(differ[::64, ::64])
    candidates = [(int(x) * 64, int(y) * 64) for y, x in zip(ys, xs)]
    x, y = next(
        (x, y)
        for x, y in candidates
        if 64 < x < SIZE - 64
        and 64 < y < SIZE - 64
        and (a[y - 12 : y + 13, x - 12 : x + 13] == a[y, x]).all()
        and (b[y - 12 : y + 13, x - 12 : x + 13] == b[y, x]).all()
    )
    zoom_to(page, x, y, 1.0)
    where = to_screen(page, x + 0.5, y + 0.5)
    image = image_colour(scene, x, y, 2)
    for mask, labels in (("m0", a), ("m1", b)):
        show(page, mask, 50)
        np.testing.assert_allclose(colour_at(screenshot(page), where), blend(image, labels[y, x], 0.5), atol=TOLERANCE)
    show(page, "m1", 100)
    np.testing.assert_allclose(colour_at(screenshot(page), where), PALETTE[b[y, x]], atol=TOLERANCE)
    show(page, "m1", 0)
    np.testing.assert_allclose(colour_at(screenshot(page), where), image, atol=TOLERANCE)
    assert page.inner_text("#opacity-value") == "0%"
    show(page, "m0", 50)
    assert not page.problems


def test_the_cursor_shows_the_pixel_and_its_class(page, scene):
    labels = scene.labels[0]
    points = uniform_points(labels, 12)
    assert sorted(points) == [0, 1, 2, 3]
    for label, (x, y) in points.items():
        zoom_to(page, x, y, 2.0)  # two screen pixels per image pixel: the centre of (x, y) is unambiguous
        page.mouse.move(*to_screen(page, x + 0.5, y + 0.5))
        page.wait_for_function(
            "([x, y]) => document.getElementById('cursor-xy').textContent === `x ${x}, y ${y}` && "
            "document.getElementById('cursor-class').dataset.classId !== undefined",
            arg=[x, y],
            timeout=30_000,
        )
        assert page.inner_text("#cursor-class .name") == CLASSES[label]
        assert page.get_attribute("#cursor-class", "data-class-id") == str(label)
    page.mouse.move(1, 1)  # off the image, onto the panel
    assert page.inner_text("#cursor-xy") == "—"
    if SCREENSHOT:
        save_readme_screenshot(page, scene, Path(SCREENSHOT))
    assert not page.problems


def test_requests_outside_the_given_files_are_refused(page, server, scene):
    # the browser loaded nothing from anywhere else: the page, its scripts and every tile came from the server
    assert page.requested and all(url.startswith(server.url) or url.startswith("data:") for url in page.requested)
    assert any("/image_files/13/" in url for url in page.requested)
    from_page = page.evaluate(
        "paths => Promise.all(paths.map(p => fetch(p).then(r => r.status)))",
        [
            str(scene.image),  # the absolute path of a file the server was given
            "/static" + str(scene.masks[0]),
            "/static/../../../../etc/passwd",
            "/static/%2e%2e/server.py",
            "/dzi/0123456789abcdef/image.dzi",
            "/api/areas/../../etc/hostname",
        ],
    )
    assert from_page == [404] * 6
    for path in ("/static/../server.py", "/../../../../etc/passwd", str(scene.image)):  # sent as written
        connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
        connection.request("GET", path)
        assert connection.getresponse().status == 404, path
        connection.close()


def save_readme_screenshot(page, scene, path: Path) -> None:
    """The README's picture: both masks' page at a mid zoom with the cursor on a class, as a small PNG."""
    page.set_viewport_size({"width": 1100, "height": 640})
    try:
        show(page, "m1", 55)
        zoom_to(page, 3000, 4200, 0.25)
        x, y = uniform_points(scene.labels[1], 40, step=32, around=(3000, 4200, 900))[3]
        page.mouse.move(*to_screen(page, x + 0.5, y + 0.5))
        page.wait_for_function("() => document.getElementById('cursor-class').dataset.classId !== undefined")
        shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
        path.parent.mkdir(parents=True, exist_ok=True)
        shot.quantize(colors=192, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    finally:
        page.set_viewport_size(VIEWPORT)
        show(page, "m0", 50)


# -- detection boxes ------------------------------------------------------------------------------------

BOX_SIZE = 2048
GREY = 90
#: a car (red) and a ship (blue), as ``gigaseg predict`` writes a detector's boxes
BOXES = Detections(
    np.array([[400, 300, 800, 700], [1200, 1200, 1500, 1400]], np.float32),
    np.array([0.9, 0.3], np.float32),
    np.array([0, 1], np.int64),
)


@pytest.fixture(scope="module")
def box_page(browser, tmp_path_factory):
    root = tmp_path_factory.mktemp("viewer_boxes")
    image = root / "grey.tif"
    write_tiled_tiff(
        image, BOX_SIZE, BOX_SIZE, 3, np.uint8, lambda w: np.full((w.height, w.width, 3), GREY, np.uint8), tile=256
    )
    boxes = write_detections_geojson(root / "grey.geojson", BOXES, ["car", "ship"], palette=[(255, 0, 0), (0, 0, 255)])
    with ViewerServer(image, [], detections=[boxes]).start() as server:
        page = open_page(browser, server)
        yield page
        page.close()


def test_boxes_are_drawn_in_their_class_colours_and_switch_off(box_page):
    page = box_page
    assert page.inner_text("#boxes label").strip() == "grey.geojson (2)"
    assert page.locator(".box-classes td").all_inner_texts() == ["", "car", "1", "", "ship", "1"]
    zoom_to(page, 600, 500, 2.0)  # two screen pixels per image pixel
    # the car's left outline covers pixels 400 and 401 (4 screen pixels): its middle, and the box's
    edge, inside = to_screen(page, 401, 500), to_screen(page, 600, 500)
    shot = screenshot(page)
    np.testing.assert_allclose(colour_at(shot, edge, half=1), (255, 0, 0), atol=TOLERANCE)
    np.testing.assert_allclose(colour_at(shot, inside), (GREY, GREY, GREY), atol=TOLERANCE)
    page.mouse.move(*to_screen(page, 600.5, 500.5))
    page.wait_for_function("() => document.querySelectorAll('#cursor-boxes li').length === 1", timeout=30_000)
    assert page.inner_text("#cursor-boxes li").strip() == "car 0.90"
    page.uncheck("#boxes-d0")
    wait_idle(page)
    np.testing.assert_allclose(colour_at(screenshot(page), edge, half=1), (GREY, GREY, GREY), atol=TOLERANCE)
    assert page.locator("#cursor-boxes li").count() == 0
    page.check("#boxes-d0")
    zoom_to(page, 1350, 1300, 2.0)
    np.testing.assert_allclose(
        colour_at(screenshot(page), to_screen(page, 1201, 1300), half=1), (0, 0, 255), atol=TOLERANCE
    )
    assert not page.problems
