"""``gigaseg view``: an image and its label masks in the browser, at any size.

A local web server (:class:`ViewerServer`, standard library only) serves Deep Zoom tiles cut on
demand from the files' pyramids (:mod:`gigaseg.viewer.tiles`) to an OpenSeadragon page: the
mask over the image with an opacity slider, a switch between masks (e.g. two methods' results),
a legend of class colours, names and exact areas, and the pixel coordinates and class under the
cursor. Memory stays bounded whatever the image's size (tiles are read lazily and kept in a small
LRU cache). The server binds to 127.0.0.1 unless told otherwise and serves only the files it was
given.

    import gigaseg
    url = gigaseg.view("scene.tif", ["predictions/scene.tif"])   # serves in the background

The page's files are in ``static/``: ``index.html``, ``viewer.js`` and ``viewer.css`` are
gigaseg's; ``openseadragon.min.js`` and ``images/`` are OpenSeadragon 6.1.1 (BSD-3-Clause, see
``LICENSE-openseadragon.txt``), copied from its npm package with the source-map comment removed.
A detector's boxes (``gigaseg predict``'s OUT/<name>.json and .geojson) are not drawn on the page;
``gigaseg predict --overlay`` draws them on the overview PNG.
"""

from .server import ViewerServer, open_in_browser, serve, stop_all, view

__all__ = ["ViewerServer", "open_in_browser", "serve", "stop_all", "view"]
