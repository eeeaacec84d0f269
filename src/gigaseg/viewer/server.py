"""The ``gigaseg view`` web server: an image, its masks and its boxes as Deep Zoom tiles for OpenSeadragon.

A :class:`ViewerServer` is a standard-library ``ThreadingHTTPServer`` bound to 127.0.0.1 by
default. It serves exactly these paths, and answers 404 to every other one (405 to methods
other than GET and HEAD); nothing taken from a URL ever reaches the filesystem: the files it
was given are opened when it starts and named in URLs only by opaque ids (``image``, masks
``m0``, ``m1``, ..., detection files ``d0``, ..., under a random session token), and the
page's own files are read from the package into memory when it starts:

- ``/``: the page (``static/index.html``); ``/static/<name>``: its scripts, styles and
  OpenSeadragon's button images, shipped inside the package (no network at run time);
- ``/api/info``: the image's size, the masks' names and classes, the detection files' names,
  classes and box counts; ``/api/areas``: the exact pixel count per class of each mask
  (:class:`gigaseg.viewer.tiles.ClassCounter`, counted in background threads when the server
  starts; ``done`` false until finished); ``/api/pixel?x=X&y=Y``: each mask's class and each
  detection file's boxes at a full-resolution pixel;
- ``/dzi/<session>/<id>.dzi`` and ``/dzi/<session>/<id>_files/<level>/<col>_<row>.<format>``:
  the Deep Zoom descriptor and tiles of the image, a mask (``m<i>``) or a detection file's
  boxes (``d<i>``, :mod:`gigaseg.viewer.boxes`), kept in an LRU cache of ``cache_size`` bytes.

While bound to a loopback address it also refuses (403) requests whose ``Host`` header names
another host, so a web page cannot reach it through DNS rebinding.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import re
import secrets
import socket
import sys
import threading
import webbrowser
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from ..errors import ConfigError, GigasegError, ImageReadError
from ..geometry import Window
from ..io.base import ImageSource
from ..io.sources import open_image
from ..memory import parse_size
from .boxes import BoxLayer, read_boxes
from .tiles import ClassCounter, ImageLayer, MaskLayer, TileCache, open_mask

#: MIME types of the page's files, by extension
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}
_TILE_PATH = re.compile(r"/dzi/([0-9a-f]{16})/(image|[md]\d{1,3})_files/(\d{1,2})/(\d{1,7})_(\d{1,7})\.(jpeg|png)")
_DZI_PATH = re.compile(r"/dzi/([0-9a-f]{16})/(image|[md]\d{1,3})\.dzi")
_SECURITY_HEADERS = {
    # the page loads nothing from elsewhere; OpenSeadragon sets inline styles
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

_static_files: dict[str, tuple[bytes, str]] | None = None


def static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files shipped in ``gigaseg/viewer/static``, read once into memory.

    Returns:
        ``{relative path: (content, MIME type)}``, e.g. ``"images/home_rest.png"``.
    """
    global _static_files
    if _static_files is None:
        found: dict[str, tuple[bytes, str]] = {}
        root = resources.files(__package__) / "static"

        def walk(folder, prefix: str) -> None:
            for entry in folder.iterdir():
                name = prefix + entry.name
                if entry.is_dir():
                    walk(entry, name + "/")
                else:
                    kind = _CONTENT_TYPES.get(os.path.splitext(entry.name)[1].lower())
                    if kind is not None:
                        found[name] = (entry.read_bytes(), kind)

        walk(root, "")
        _static_files = found
    return _static_files


def _mask_labels(masks: list[MaskLayer], names: list[str] | None) -> list[str]:
    """The names the page shows for the masks: the ones given, else file names (with their folder when two clash)."""
    if names is not None:
        if len(names) != len(masks):
            raise ConfigError(f"{len(names)} mask names for {len(masks)} masks")
        return [str(name) for name in names]
    names = [os.path.basename(m.source.path) if m.source.path else f"mask {i + 1}" for i, m in enumerate(masks)]
    labels = list(names)
    for i, mask in enumerate(masks):
        if names.count(names[i]) > 1 and mask.source.path:
            folder = os.path.basename(os.path.dirname(os.path.abspath(mask.source.path)))
            labels[i] = f"{folder}/{labels[i]}"
    return labels


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ViewerServer:
    """A local web server showing an image and its label masks in the browser (see the module docstring).

    The files are opened (and checked) when the server is made; tiles are read when the page
    asks for them. Call :meth:`serve_forever` (blocks) or :meth:`start` (a background thread),
    and :meth:`close` at the end; it is also a context manager.

    Args:
        image: the image: a file path (anything ``gigaseg.open_image`` reads) or an ``ImageSource``.
        masks: label masks of the same size (paths or ``ImageSource`` objects of uint8 class ids),
            e.g. the predictions of two methods; the page switches between them.
        host: the address to bind; 127.0.0.1 (this machine only) by default.
        port: the port; 0 picks a free one.
        tile_size: side of a Deep Zoom tile.
        image_format: the image's tiles, ``"jpeg"`` (small) or ``"png"`` (exact pixels).
        cache_size: bytes (or a size like ``"64MB"``) of encoded tiles kept.
        mask_names: the names shown for the masks; None for their file names.
        detections: files of the image's boxes (``gigaseg predict``'s GeoJSON or COCO results
            json, or a COCO dataset: :func:`gigaseg.viewer.boxes.read_boxes`), drawn over the
            image and mask, each switched on and off on the page.
        min_score: boxes scoring below this are not shown.

    Raises:
        ImageReadError: the image or a mask is missing or unreadable, a mask is not a
            one-channel uint8 mask, or its size differs from the image's.
        GigasegError: a detections file is missing or in none of the formats read.
        ConfigError: a bad option, or the port is taken.
    """

    def __init__(
        self,
        image: str | os.PathLike | ImageSource,
        masks=(),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tile_size: int = 512,
        image_format: str = "jpeg",
        cache_size: int | str = "64MB",
        mask_names: list[str] | None = None,
        detections=(),
        min_score: float = 0.0,
    ):
        if not 16 <= int(tile_size) <= 4096:
            raise ConfigError(f"tile size must lie in 16..4096, got {tile_size}")
        if image_format not in ("jpeg", "png"):
            raise ConfigError(f"image tiles are jpeg or png, got {image_format!r}")
        if not 0.0 <= float(min_score) <= 1.0:
            raise ConfigError(f"the minimum score lies in 0..1, got {min_score}")
        source = open_image(image)
        self.masks: list[MaskLayer] = []
        self.boxes: list[BoxLayer] = []
        try:
            _check_readable(source)
            self.image = ImageLayer(source, tile_size=tile_size, tile_format=image_format)
            for mask in masks:
                layer = open_mask(mask, tile_size=tile_size)
                self.masks.append(layer)
                size, expected = (layer.source.height, layer.source.width), (source.height, source.width)
                if size != expected:
                    image_name = f"the image {source.path}" if source.path else "the image"
                    raise ImageReadError(
                        layer.source.path,
                        f"mask is {size[0]}x{size[1]}, {image_name} is {expected[0]}x{expected[1]}; "
                        "a mask must have its image's size",
                    )
                _check_readable(layer.source)
            self.mask_names = _mask_labels(self.masks, mask_names)
            for path in detections:
                found = read_boxes(path, source)
                self.boxes.append(
                    BoxLayer(
                        found,
                        height=source.height,
                        width=source.width,
                        tile_size=tile_size,
                        min_score=min_score,
                        name=os.path.basename(os.fspath(path)),
                    )
                )
        except BaseException:
            for opened in [source, *(m.source for m in self.masks)]:
                opened.close()
            raise
        self.cache = TileCache(parse_size(cache_size))
        self.session = secrets.token_hex(8)
        self.layers: dict = {
            "image": self.image,
            **{f"m{i}": m for i, m in enumerate(self.masks)},
            **{f"d{i}": b for i, b in enumerate(self.boxes)},
        }
        #: tiles served, by (layer id, level): what the page asked for
        self.tile_requests: Counter[tuple[str, int]] = Counter()
        self._stats_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.loopback = _is_loopback(host)
        self._reported: set[str] = set()
        try:
            self._httpd = _HTTPServer((host, int(port)), self)
        except OSError as error:
            for layer in self.layers.values():
                layer.close()
            if error.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is in use; choose another with --port (0 picks a free one)"
                ) from None
            if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"cannot bind to {host}: {error.strerror or error}") from None
            raise
        self.counters = {f"m{i}": ClassCounter(m).start() for i, m in enumerate(self.masks)}

    # -- addresses ------------------------------------------------------------------

    @property
    def host(self) -> str:
        """The bound address."""
        return self._httpd.server_address[0]

    @property
    def port(self) -> int:
        """The bound port."""
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """The page's address, e.g. ``http://127.0.0.1:8765/``."""
        host = self.host
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    def allowed_hosts(self) -> set[str]:
        """The ``Host`` headers accepted while bound to a loopback address.

        Returns:
            ``localhost``, ``127.0.0.1``, ``[::1]`` and the bound address, each with the port.
        """
        port = self.port
        names = {"localhost", "127.0.0.1", "[::1]", f"[{self.host}]" if ":" in self.host else self.host}
        return {f"{name}:{port}" for name in names}

    # -- lifetime -------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until :meth:`close` is called from another thread (or Ctrl-C)."""
        self._httpd.serve_forever(poll_interval=0.2)

    def start(self) -> ViewerServer:
        """Serve in a background (daemon) thread.

        Returns:
            The server itself.
        """
        if self._thread is None:
            self._thread = threading.Thread(target=self.serve_forever, name="gigaseg-view", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving and close the files (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
        for counter in self.counters.values():
            counter.wait(5)
        for layer in self.layers.values():
            layer.close()

    def __enter__(self) -> ViewerServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- content --------------------------------------------------------------------

    def info(self) -> dict:
        """What the page needs to know: the image, the masks and their classes.

        Returns:
            ``{"image": {...}, "masks": [{"id", "name", "dzi", "classes"}, ...], "detections":
            [{"id", "name", "dzi", "count", "classes"}, ...]}``; a mask's classes are those it
            names (colours and names; areas come from ``/api/areas``), a detection file's carry
            their box counts.
        """
        source = self.image.source
        name = os.path.basename(source.path) if source.path else "image"
        masks = []
        for index, (layer, label) in enumerate(zip(self.masks, self.mask_names)):
            classes = [
                {"id": i, "name": layer.class_name(i), "color": layer.color(i)}
                for i in range(len(layer.class_names or []))
            ]
            masks.append({"id": f"m{index}", "name": label, "dzi": self._dzi_url(f"m{index}"), "classes": classes})
        detections = []
        for index, layer in enumerate(self.boxes):
            classes = [
                {"id": i, "name": name, "color": colour, "count": count}
                for i, (name, colour, count) in enumerate(zip(layer.classes, layer.colors, layer.class_counts()))
            ]
            detections.append(
                {
                    "id": f"d{index}",
                    "name": layer.name,
                    "dzi": self._dzi_url(f"d{index}"),
                    "count": len(layer),
                    "classes": classes,
                }
            )
        return {
            "image": {
                "name": name,
                "width": source.width,
                "height": source.height,
                "channels": source.channels,
                "dtype": str(source.dtype),
                "dzi": self._dzi_url("image"),
            },
            "masks": masks,
            "detections": detections,
        }

    def _dzi_url(self, layer_id: str) -> str:
        return f"/dzi/{self.session}/{layer_id}.dzi"

    def areas(self) -> dict:
        """The per-class pixel counts of every mask, as far as they are counted.

        Returns:
            ``{mask id: ClassCounter.status()}``.
        """
        return {layer_id: counter.status() for layer_id, counter in self.counters.items()}

    def pixel(self, x: int, y: int) -> dict:
        """Each mask's class and each detection file's boxes at a full-resolution pixel.

        Args:
            x: the pixel's column.
            y: the pixel's row.

        Returns:
            ``{"x", "y", "inside": bool, "labels": {mask id: {"id", "name", "color"}}, "boxes":
            {detections id: [{"class", "name", "color", "score", "box"}, ...]}}`` (boxes best first).
        """
        source = self.image.source
        inside = 0 <= x < source.width and 0 <= y < source.height
        labels = {}
        if inside:
            for index, layer in enumerate(self.masks):
                label = layer.label_at(x, y)
                labels[f"m{index}"] = {"id": label, "name": layer.class_name(label), "color": layer.color(label)}
        boxes = {f"d{index}": layer.boxes_at(x, y) for index, layer in enumerate(self.boxes)} if inside else {}
        return {"x": x, "y": y, "inside": inside, "labels": labels, "boxes": boxes}

    def report(self, error: Exception) -> None:
        """Print a failed request's error on stderr as one line, once per distinct message.

        Args:
            error: what went wrong (a file that cannot be read, say).
        """
        message = str(error)
        if message not in self._reported:
            self._reported.add(message)
            print(f"gigaseg view: error: {message}", file=sys.stderr, flush=True)

    def tile(self, layer_id: str, level: int, col: int, row: int) -> bytes:
        """An encoded tile, from the cache or read and encoded now.

        Args:
            layer_id: ``"image"``, a mask's id (``"m0"``, ...) or a detection file's (``"d0"``, ...).
            level: the Deep Zoom level.
            col: the tile's column.
            row: the tile's row.

        Returns:
            The tile's bytes.

        Raises:
            KeyError: no such layer or tile.
            ImageReadError: the file cannot be read.
        """
        layer = self.layers[layer_id]
        key = (layer_id, level, col, row)
        data = self.cache.get(key)
        if data is None:
            data = layer.tile(level, col, row)
            self.cache.put(key, data)
        with self._stats_lock:
            self.tile_requests[(layer_id, level)] += 1
        return data


def _check_readable(source: ImageSource) -> None:
    """Decode one pixel, so a corrupt file is refused when the server starts rather than tile by tile."""
    source.read(Window(0, 0, 1, 1))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], viewer: ViewerServer):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.viewer = viewer
        super().__init__(address, _Handler)

    def handle_error(self, request, client_address) -> None:
        """An error outside the request handlers' own: nothing for a dropped connection, else one line.

        The standard library prints a traceback here, e.g. when a browser resets a kept-alive
        connection while the server waits for its next request.
        """
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return
        self.viewer.report(RuntimeError(f"{type(error).__name__}: {error}"))


class _Handler(BaseHTTPRequestHandler):
    """Routes the requests of one connection (see the module docstring for the paths)."""

    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "gigaseg-view"
    sys_version = ""

    def log_message(self, format, *args):
        pass  # one line per tile would flood the terminal; errors are reported by _fail

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _refuse_method(self) -> None:
        self._send(405, b"method not allowed\n", "text/plain; charset=utf-8", extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def _respond(self, send_body: bool) -> None:
        viewer = self.server.viewer
        self._send_body = send_body
        if viewer.loopback and self.headers.get("Host", "") not in viewer.allowed_hosts():
            self._send(403, b"forbidden: unknown Host\n", "text/plain; charset=utf-8")
            return
        parts = urlsplit(self.path)
        path = parts.path
        try:
            if path in ("/", "/index.html"):
                self._static("index.html", cache="no-cache")
            elif path.startswith("/static/"):
                self._static(path[len("/static/") :], cache="max-age=3600")
            elif path == "/api/info":
                self._json(viewer.info())
            elif path == "/api/areas":
                self._json(viewer.areas())
            elif path == "/api/pixel":
                self._pixel(parts.query)
            elif match := _DZI_PATH.fullmatch(path):
                self._dzi(*match.groups())
            elif match := _TILE_PATH.fullmatch(path):
                self._tile(*match.groups())
            else:
                self._not_found()
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as error:  # noqa: BLE001 - one line on stderr and a 500, never a traceback per request
            self._fail(error if isinstance(error, GigasegError) else RuntimeError(f"{type(error).__name__}: {error}"))

    # -- answers ----------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, *, cache: str = "no-store", extra=None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        for name, value in {**_SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if getattr(self, "_send_body", True):
            self.wfile.write(body)

    def _not_found(self) -> None:
        self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _json(self, value: dict) -> None:
        self._send(200, json.dumps(value).encode(), "application/json")

    def _static(self, name: str, cache: str) -> None:
        entry = static_files().get(name)  # a lookup in a dict built from the package, never a path
        if entry is None:
            self._not_found()
            return
        content, kind = entry
        self._send(200, content, kind, cache=cache)

    def _pixel(self, query: str) -> None:
        values = parse_qs(query)
        try:
            x, y = int(values["x"][0]), int(values["y"][0])
        except (KeyError, ValueError, IndexError):
            self._send(400, b"expected ?x=<column>&y=<row>\n", "text/plain; charset=utf-8")
            return
        try:
            self._json(self.server.viewer.pixel(x, y))
        except GigasegError as error:
            self._fail(error)

    def _dzi(self, session: str, layer_id: str) -> None:
        viewer = self.server.viewer
        layer = viewer.layers.get(layer_id)
        if session != viewer.session or layer is None:
            self._not_found()
            return
        body = layer.geometry.dzi(layer.tile_format).encode()
        self._send(200, body, "application/xml", cache="no-cache")

    def _tile(self, session: str, layer_id: str, level: str, col: str, row: str, tile_format: str) -> None:
        viewer = self.server.viewer
        layer = viewer.layers.get(layer_id)
        if session != viewer.session or layer is None or tile_format != layer.tile_format:
            self._not_found()
            return
        level_, col_, row_ = int(level), int(col), int(row)
        if not layer.geometry.has_tile(level_, col_, row_):
            self._not_found()
            return
        try:
            data = viewer.tile(layer_id, level_, col_, row_)
        except GigasegError as error:
            self._fail(error)
            return
        self._send(200, data, layer.content_type, cache="private, max-age=3600")

    def _fail(self, error: Exception) -> None:
        self.server.viewer.report(error)
        self._send(500, f"{error}\n".encode(), "text/plain; charset=utf-8")


# -- the Python API ------------------------------------------------------------------------

#: servers started by :func:`view` (kept so they live as long as the interpreter)
_RUNNING: list[ViewerServer] = []


def serve(image, masks=(), **options) -> ViewerServer:
    """Start a :class:`ViewerServer` in a background thread.

    Args:
        image: the image (a path or an ``ImageSource``).
        masks: its label masks (paths or ``ImageSource`` objects).
        **options: :class:`ViewerServer`'s keyword arguments (``host``, ``port``, ``tile_size``,
            ``image_format``, ``cache_size``, ``mask_names``, ``detections``, ``min_score``).

    Returns:
        The running server; ``server.url`` is the page, ``server.close()`` stops it.
    """
    return ViewerServer(image, masks, **options).start()


def view(image, masks=(), *, open_browser: bool = False, block: bool = False, **options) -> str:
    """Show an image and its masks in the browser: start a local viewer server and return its address.

    The server runs in a background thread until the interpreter exits (or :func:`stop_all`),
    or, with ``block``, in this thread until Ctrl-C.

    Args:
        image: the image (a path or an ``ImageSource``).
        masks: its label masks, e.g. ``["pred/scene.tif"]``; a single path is accepted too.
        open_browser: also open the page in the default web browser.
        block: serve in this thread until Ctrl-C, then stop.
        **options: :class:`ViewerServer`'s keyword arguments (``host``, ``port``, ...).

    Returns:
        The page's URL, e.g. ``"http://127.0.0.1:41231/"``.
    """
    if isinstance(masks, (str, os.PathLike, ImageSource)):
        masks = [masks]
    server = ViewerServer(image, list(masks), **options)
    if open_browser:
        open_in_browser(server.url)
    if not block:
        _RUNNING.append(server.start())
        return server.url
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return server.url


def stop_all() -> None:
    """Stop every server :func:`view` started in the background."""
    while _RUNNING:
        _RUNNING.pop().close()


def open_in_browser(url: str) -> bool:
    """Open ``url`` in the default web browser when this machine has a graphical one.

    On Linux without ``DISPLAY`` or ``WAYLAND_DISPLAY`` nothing is opened (a text-mode browser
    would take over the terminal).

    Args:
        url: the address.

    Returns:
        True when a browser was asked to open it.
    """
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        return bool(webbrowser.open(url, new=2))
    except webbrowser.Error:
        return False
