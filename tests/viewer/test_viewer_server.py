"""The viewer's HTTP server without a browser: what it serves, and everything it refuses."""

from __future__ import annotations

import http.client
import io
import json
import socket
import struct
import time
import urllib.request

import numpy as np
import pytest
import tifffile
from PIL import Image

import gigaseg
from gigaseg.errors import ConfigError, ImageReadError
from gigaseg.io.writers import MaskWriter
from gigaseg.viewer import ViewerServer, serve, stop_all

H, W = 700, 900
CLASSES = ["water", "forest", "cropland"]


def write_mask(path, labels, names=CLASSES, tile=64):
    path.parent.mkdir(parents=True, exist_ok=True)
    with MaskWriter(
        path, *labels.shape, palette=[(0, 0, 255), (0, 160, 0), (230, 200, 0)], class_names=names, tile=tile
    ) as w:
        for top in w.band_tops:
            w.write_band(top, labels[w.band_window(top).slices])
    return path


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    image = root / "scene.tif"
    tifffile.imwrite(image, pixels, tile=(128, 128), photometric="rgb")
    a = np.repeat(np.repeat(rng.integers(0, 3, (H // 10, W // 10)), 10, axis=0), 10, axis=1).astype(np.uint8)
    b = a.copy()
    b[:, : W // 2] = 2
    masks = [write_mask(root / "a" / "scene.tif", a), write_mask(root / "b" / "scene.tif", b)]
    return {"image": image, "pixels": pixels, "masks": masks, "labels": [a, b], "root": root}


@pytest.fixture(scope="module")
def server(scene):
    with ViewerServer(scene["image"], scene["masks"], tile_size=256, image_format="png").start() as running:
        yield running


def get(server, path, headers=None):
    """GET ``path`` exactly as written (no normalisation by the client); returns (status, body, headers)."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def get_json(server, path):
    status, body, _ = get(server, path)
    assert status == 200, (path, status, body)
    return json.loads(body)


def test_binds_to_localhost_by_default(server):
    assert server.host == "127.0.0.1"
    assert server.url == f"http://127.0.0.1:{server.port}/"


def test_the_page_and_its_files_come_from_the_package(server):
    status, body, headers = get(server, "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"/static/openseadragon.min.js" in body and b"/static/viewer.js" in body
    # nothing on the page is fetched from elsewhere
    assert b"http://" not in body and b"https://" not in body and b"//cdn" not in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for path, kind, start in (
        ("/static/openseadragon.min.js", "text/javascript", b"//! openseadragon 6."),
        ("/static/viewer.js", "text/javascript", b"/* gigaseg view"),
        ("/static/viewer.css", "text/css", b""),
        ("/static/images/zoomin_rest.png", "image/png", b"\x89PNG"),
        ("/static/LICENSE-openseadragon.txt", "text/plain", b"Copyright"),
    ):
        status, body, headers = get(server, path)
        assert status == 200 and headers["Content-Type"].startswith(kind) and body.startswith(start), path


def test_info_names_the_image_the_masks_and_their_classes(server):
    info = get_json(server, "/api/info")
    assert info["image"]["name"] == "scene.tif"
    assert (info["image"]["width"], info["image"]["height"]) == (W, H)
    # two masks with one file name: shown with their folders
    assert [m["name"] for m in info["masks"]] == ["a/scene.tif", "b/scene.tif"]
    assert [m["id"] for m in info["masks"]] == ["m0", "m1"]
    assert [c["name"] for c in info["masks"][0]["classes"]] == CLASSES
    assert [c["color"] for c in info["masks"][0]["classes"]] == ["#0000ff", "#00a000", "#e6c800"]


def test_areas_are_the_exact_class_counts(server, scene):
    deadline = time.monotonic() + 60
    areas = get_json(server, "/api/areas")
    while not all(status["done"] for status in areas.values()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
        areas = get_json(server, "/api/areas")
    for mask_id, labels in zip(("m0", "m1"), scene["labels"]):
        hand = np.bincount(labels.ravel(), minlength=3)
        listed = areas[mask_id]["classes"]
        assert [c["name"] for c in listed] == CLASSES
        assert [c["pixels"] for c in listed] == hand.tolist()
        assert sum(c["fraction"] for c in listed) == pytest.approx(1.0)


def test_pixel_gives_each_masks_class(server, scene):
    a, b = scene["labels"]
    for x, y in ((0, 0), (W - 1, H - 1), (123, 456), (600, 10)):
        answer = get_json(server, f"/api/pixel?x={x}&y={y}")
        assert answer["inside"] and (answer["x"], answer["y"]) == (x, y)
        assert answer["labels"]["m0"]["id"] == a[y, x] and answer["labels"]["m1"]["id"] == b[y, x]
        assert answer["labels"]["m0"]["name"] == CLASSES[a[y, x]]
    assert get_json(server, f"/api/pixel?x={W}&y=0") == {"x": W, "y": 0, "inside": False, "labels": {}, "boxes": {}}
    assert get(server, "/api/pixel?x=abc&y=1")[0] == 400
    assert get(server, "/api/pixel?y=1")[0] == 400


def test_deep_zoom_descriptor_and_tiles_hold_the_files_pixels(server, scene):
    info = get_json(server, "/api/info")
    status, body, headers = get(server, info["image"]["dzi"])
    assert status == 200 and headers["Content-Type"] == "application/xml"
    assert f'<Size Width="{W}" Height="{H}"/>'.encode() in body and b'TileSize="256"' in body
    base = info["image"]["dzi"].removesuffix(".dzi")
    # full resolution is level 10 (1024 >= 900); tile (3, 2) is the 188 x 132 corner
    status, body, headers = get(server, f"{base}_files/10/3_2.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    tile = np.asarray(Image.open(io.BytesIO(body)))
    np.testing.assert_array_equal(tile, scene["pixels"][512:700, 768:900])
    mask_base = info["masks"][1]["dzi"].removesuffix(".dzi")
    status, body, _ = get(server, f"{mask_base}_files/10/1_0.png")
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(body))), scene["labels"][1][0:256, 256:512])
    assert server.tile_requests[("image", 10)] >= 1 and server.tile_requests[("m1", 10)] >= 1
    assert server.cache.size_bytes <= server.cache.max_bytes


def test_paths_outside_the_given_files_are_refused(server, scene):
    info = get_json(server, "/api/info")
    session = info["image"]["dzi"].split("/")[2]
    image = str(scene["image"])
    refused = [
        "/etc/passwd",
        "/../../../../etc/passwd",
        "//etc/passwd",
        "/static/../../../../etc/passwd",
        "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/static/%2e%2e/%2e%2e/server.py",
        "/static/../server.py",
        "/static/../tiles.py",
        "/static/images/../../server.py",
        "/static/..\\server.py",
        "/static/",
        "/static//etc/passwd",
        "/api/info/../../../etc/passwd",
        "/favicon.ico",
        image,
        "/" + image,
        "/static" + image,
        f"/dzi/{session}/{image}",
        f"/dzi/{session}/../../{scene['masks'][0]}",
        f"/dzi/{session}/image_files/10/../../../../etc/passwd",
        f"/dzi/{session}/image_files/11/0_0.png",  # no level 11
        f"/dzi/{session}/image_files/10/4_0.png",  # no column 4
        f"/dzi/{session}/image_files/10/0_0.jpeg",  # the image's tiles are png here
        f"/dzi/{session}/m2.dzi",  # no third mask
        f"/dzi/{session}/m2_files/10/0_0.png",
        "/dzi/0123456789abcdef/image.dzi",  # another session
        f"/dzi/{session}/image.dzi/..",
    ]
    for path in refused:
        status, body, _ = get(server, path)
        assert status == 404, (path, status)
        assert body == b"not found\n", path
    assert get(server, f"/dzi/{session}/image.dzi")[0] == 200  # the same server serves what it was given


def test_other_methods_and_foreign_hosts_are_refused(server):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    connection.request("POST", "/api/info", body=b"x")
    response = connection.getresponse()
    assert response.status == 405 and response.getheader("Allow") == "GET, HEAD"
    response.read()
    connection.close()
    # a page elsewhere reaching the server through DNS rebinding sends its own host name
    status, body, _ = get(server, "/api/info", headers={"Host": f"evil.example:{server.port}"})
    assert status == 403
    assert get(server, "/api/info", headers={"Host": f"localhost:{server.port}"})[0] == 200


def test_head_answers_headers_only(server):
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    connection.request("HEAD", "/static/viewer.js")
    response = connection.getresponse()
    assert response.status == 200 and int(response.getheader("Content-Length")) > 1000
    assert response.read() == b""
    connection.close()


# -- bad input ---------------------------------------------------------------------------------------


def test_a_mask_of_another_size_is_refused_naming_it(scene, tmp_path):
    small = write_mask(tmp_path / "small.tif", np.zeros((H, W - 1), np.uint8))
    with pytest.raises(ImageReadError) as error:
        ViewerServer(scene["image"], [scene["masks"][0], small])
    assert str(error.value) == (
        f"{small}: mask is {H}x{W - 1}, the image {scene['image']} is {H}x{W}; a mask must have its image's size"
    )


def test_missing_and_corrupt_files_are_refused_naming_them(scene, tmp_path):
    with pytest.raises(ImageReadError, match="missing.tif: file not found"):
        ViewerServer(tmp_path / "missing.tif")
    with pytest.raises(ImageReadError, match="nomask.tif: file not found"):
        ViewerServer(scene["image"], [tmp_path / "nomask.tif"])
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00" + b"\x00" * 60)
    with pytest.raises(ImageReadError, match="broken.tif"):
        ViewerServer(scene["image"], [broken])
    truncated = tmp_path / "truncated.tif"
    data = scene["masks"][0].read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageReadError, match="truncated.tif"):
        ViewerServer(scene["image"], [truncated])


def test_a_taken_port_is_a_one_line_error(server, scene):
    with pytest.raises(ConfigError, match=f"port {server.port} on 127.0.0.1 is in use"):
        ViewerServer(scene["image"], port=server.port)


# -- the Python API ------------------------------------------------------------------------------------


def test_gigaseg_view_returns_the_url_of_a_running_server(scene):
    url = gigaseg.view(scene["image"], scene["masks"][0])
    try:
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url + "api/info", timeout=30) as response:
            info = json.load(response)
        assert info["image"]["name"] == "scene.tif" and [m["name"] for m in info["masks"]] == ["scene.tif"]
    finally:
        stop_all()
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "api/info", timeout=5)


def test_serve_takes_image_sources_and_mask_names(scene):
    source = gigaseg.open_image(scene["image"])
    with serve(source, scene["masks"], mask_names=["method A", "method B"], image_format="png") as running:
        info = get_json(running, "/api/info")
        assert [m["name"] for m in info["masks"]] == ["method A", "method B"]


def test_a_file_that_breaks_while_served_answers_500_with_one_line(scene, tmp_path, capfd):
    image = tmp_path / "scene.tif"
    image.write_bytes(scene["image"].read_bytes())
    with serve(image, image_format="png", tile_size=256) as running:
        with open(image, "r+b") as file:  # the file loses its last tiles after the server checked it
            file.truncate(image.stat().st_size // 2)
        session = running.session
        for _ in range(2):
            status, body, _ = get(running, f"/dzi/{session}/image_files/10/3_2.png")
            assert status == 500 and b"truncated" in body
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gigaseg view: error: {image}: cannot ") and "truncated" in err
    assert "Traceback" not in err


def test_a_connection_the_browser_resets_prints_nothing(scene, capfd):
    with serve(scene["image"]) as running:
        for _ in range(3):  # a kept-alive connection closed with a reset while the server waits for a request
            client = socket.create_connection((running.host, running.port), timeout=30)
            client.sendall(b"GET /api/info HTTP/1.1\r\nHost: " + f"127.0.0.1:{running.port}".encode() + b"\r\n\r\n")
            client.recv(65536)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
        time.sleep(0.5)
        assert get(running, "/api/info")[0] == 200
    assert capfd.readouterr().err == ""


def test_every_file_of_the_page_ships_in_the_wheel():
    import fnmatch
    import tomllib
    from pathlib import Path

    import gigaseg.viewer

    root = Path(gigaseg.viewer.__file__).parent
    patterns = tomllib.loads((root.parents[2] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = [p.removeprefix("viewer/") for p in patterns["gigaseg"] if p.startswith("viewer/")]
    files = [p.relative_to(root).as_posix() for p in (root / "static").rglob("*") if p.is_file()]
    assert len(files) > 40
    assert [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in shipped)] == []
