"""Shared fixtures: the real data folder (skips when absent) and seeded generators."""

from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

# The real research data lives beside the repository, never inside it (see ../shared/data/README.md).
SHARED_DATA = Path(os.environ.get("RETRBENCH_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def shared_path(*parts: str) -> Path:
    """Path under the shared real-data folder, skipping the test with a reason when absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not available: {p} is absent (set RETRBENCH_SHARED_DATA to the shared/data folder)")
    return p


@pytest.fixture
def shared_data() -> Path:
    return shared_path()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Keep every test's caches, data and default ``results/`` folder out of the user's home and
    the repository (session-wide, so that module-scoped fixtures see the same roots as the tests)."""
    root = tmp_path_factory.getbasetemp() / "retrbench-cache"
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETRBENCH_CACHE", str(root))
        mp.setenv("RETRBENCH_DATA", str(root / "data"))
        mp.chdir(cwd)
        yield


@pytest.fixture(scope="module", autouse=True)
def _one_thread_for_backbone_tests(request: pytest.FixtureRequest):
    """Backbone tests run small inputs: one intra-op thread is fast there, and immune to
    busy-waiting on a loaded machine."""
    if request.path.parent.name != "backbones":
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A local HTTP server for download tests (nothing here reaches the internet).
class _RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files[path]`` honouring ``Range: bytes=N-``.

    Prefix ``/norange`` ignores Range; prefix ``/short`` always drops the connection half-way;
    paths in ``server.drop_once`` are cut half-way once.
    """

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        data = self.server.files.get(self.path.split("?")[0].replace("/norange", "", 1).replace("/short", "", 1))  # type: ignore[attr-defined]
        rng = self.headers.get("Range")
        self.server.log.append((self.path, rng))  # type: ignore[attr-defined]
        if data is None:
            self.send_error(404)
            return
        start = 0
        if rng and not self.path.startswith("/norange"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.server.drop_once:  # type: ignore[attr-defined]
            self.server.drop_once.discard(self.path)  # type: ignore[attr-defined]
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        if self.path.startswith("/short"):  # the connection drops half-way
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler)
    srv.files = {}  # type: ignore[attr-defined]
    srv.log = []  # type: ignore[attr-defined]
    srv.drop_once = set()  # type: ignore[attr-defined]
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


@pytest.fixture
def without_h5py(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import h5py`` fails inside the test, as on a machine without the ``h5`` extra."""
    import builtins

    real = builtins.__import__

    def no_h5py(name: str, *a, **k):  # noqa: ANN002, ANN003
        if name == "h5py":
            raise ImportError("no h5py")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_h5py)
