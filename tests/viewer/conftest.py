"""Fixtures of the viewer's tests."""

from __future__ import annotations

import json
import threading
import urllib.request

import pytest

from gigaseg.viewer import ViewerServer


@pytest.fixture
def served_info(monkeypatch) -> list[dict]:
    """Make every ViewerServer answer its page's ``/api/info`` once, then stop as after Ctrl-C.

    Returns:
        The list each server's ``/api/info`` answer is appended to (no browser is opened).
    """
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    seen: list[dict] = []
    serve_forever = ViewerServer.serve_forever

    def serve_once(self):  # serve while the page's data is asked for once, then "press Ctrl-C"
        thread = threading.Thread(target=serve_forever, args=(self,), daemon=True)
        thread.start()
        try:
            with urllib.request.urlopen(self.url + "api/info", timeout=30) as response:
                seen.append(json.load(response))
        finally:
            self._httpd.shutdown()
            thread.join()
        raise KeyboardInterrupt

    monkeypatch.setattr(ViewerServer, "serve_forever", serve_once)
    return seen
