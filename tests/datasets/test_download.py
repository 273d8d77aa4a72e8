"""retrbench.datasets.download: download, safe unpacking into the loaders' layouts, resume, checksum, skip."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest

from retrbench.datasets import download as dl
from retrbench.datasets import load_dataset
from retrbench.datasets.download import SOURCES, Archive, download_dataset


def _base(srv: http.server.ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/mirror"


def _path(archive: Archive) -> str:
    """The path a ``base_url=<server>/mirror`` download requests for this archive."""
    return "/mirror" + dl.urllib.parse.urlparse(archive.url).path


def _tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _coil_zip(n_objects: int = 2) -> bytes:
    members = {f"coil-20-proc/obj{o}__{v}.png": b"png" for o in range(1, n_objects + 1) for v in range(72)}
    members["coil-20-proc/README.txt"] = b"not an image"
    return _zip(members)


def _serve_coil(srv: http.server.ThreadingHTTPServer, data: bytes | None = None) -> str:
    path = _path(SOURCES["coil20"][0])
    srv.files[path] = _coil_zip() if data is None else data  # type: ignore[attr-defined]
    return path


def _roxford_gnd(names: list[str], queries: list[str]) -> bytes:
    gnd = [{"easy": [0], "hard": [1], "junk": [], "bbx": [0.0, 0.0, 10.0, 10.0]} for _ in queries]
    return pickle.dumps({"imlist": names, "qimlist": queries, "gnd": gnd})


# ----------------------------------------------------------------------------- full downloads


def test_coil20_download_unpacks_into_loader_layout(server, tmp_path: Path) -> None:
    _serve_coil(server)
    root = download_dataset("coil20", tmp_path, base_url=_base(server), progress=False)
    assert root == tmp_path
    assert (tmp_path / "coil20" / "obj1__0.png").is_file()  # flattened, the README left out
    assert not (tmp_path / "coil20" / "README.txt").exists()
    ds = load_dataset("coil20", tmp_path)
    assert len(ds.images) == 2 * 72
    assert not (tmp_path / "_downloads" / "coil-20-proc.zip").exists()  # archive removed after unpacking
    assert (tmp_path / "_downloads" / "coil20" / "coil-20-proc.zip.complete").is_file()


def test_roxford5k_download_flattens_and_loads(server, tmp_path: Path) -> None:
    names, queries = ["all_souls_000001", "radcliffe_000002", "bodleian_000003"], ["ashmolean_000004"]
    gnd, images = SOURCES["roxford5k"]
    server.files[_path(gnd)] = _roxford_gnd(names, queries)
    server.files[_path(images)] = _tgz({f"oxbuild_images/{n}.jpg": b"jpg" for n in names + queries})
    download_dataset("roxford5k", tmp_path, base_url=_base(server), progress=False, keep_archives=True)
    assert sorted(p.name for p in (tmp_path / "roxford5k" / "jpg").iterdir()) == sorted(
        f"{n}.jpg" for n in names + queries
    )
    ds = load_dataset("roxford5k", tmp_path)  # check_images=True: every listed image is found
    assert len(ds.images) == 3 and len(ds.queries) == 1
    assert (tmp_path / "_downloads" / "oxbuild_images-v1.tgz").is_file()  # keep_archives


def test_rparis6k_merges_both_archives_flat(server, tmp_path: Path) -> None:
    gnd, p1, p2 = SOURCES["rparis6k"]
    server.files[_path(gnd)] = _roxford_gnd(["paris_defense_000001", "paris_eiffel_000002"], ["paris_louvre_000003"])
    server.files[_path(p1)] = _tgz(
        {"paris/defense/paris_defense_000001.jpg": b"a", "paris/eiffel/paris_eiffel_000002.jpg": b"b"}
    )
    server.files[_path(p2)] = _tgz({"paris/louvre/paris_louvre_000003.jpg": b"c"})
    download_dataset("rparis6k", tmp_path, base_url=_base(server), progress=False)
    jpg = tmp_path / "rparis6k" / "jpg"
    assert sorted(p.name for p in jpg.iterdir()) == [
        "paris_defense_000001.jpg",
        "paris_eiffel_000002.jpg",
        "paris_louvre_000003.jpg",
    ]
    assert len(load_dataset("rparis6k", tmp_path).images) == 2


# ----------------------------------------------------------------------------- resume, checksum, safety, skip


def test_interrupted_download_resumes(server, tmp_path: Path) -> None:
    data = _coil_zip()
    path = _serve_coil(server, data)
    server.drop_once.add(path)
    download_dataset("coil20", tmp_path, base_url=_base(server), progress=False)
    assert server.log == [(path, None), (path, f"bytes={len(data) // 2}-")]  # the second request resumes
    assert len(load_dataset("coil20", tmp_path).images) == 144


def test_checksum_mismatch_refused_nothing_unpacked(server, tmp_path: Path, monkeypatch) -> None:
    _serve_coil(server)
    bad = dataclasses.replace(SOURCES["coil20"][0], sha256=hashlib.sha256(b"something else").hexdigest())
    monkeypatch.setitem(SOURCES, "coil20", [bad])
    with pytest.raises(ValueError, match="checksum mismatch"):
        download_dataset("coil20", tmp_path, base_url=_base(server), progress=False)
    assert not (tmp_path / "coil20").exists()
    assert not list((tmp_path / "_downloads").glob("coil-20-proc.zip*"))  # no archive, no part file
    assert not (tmp_path / "_downloads" / "coil20" / "coil-20-proc.zip.complete").exists()


def test_checksum_match_accepted(server, tmp_path: Path, monkeypatch) -> None:
    data = _coil_zip()
    _serve_coil(server, data)
    good = dataclasses.replace(SOURCES["coil20"][0], sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(SOURCES, "coil20", [good])
    download_dataset("coil20", tmp_path, base_url=_base(server), progress=False)
    assert (tmp_path / "coil20" / "obj2__71.png").is_file()


@pytest.mark.parametrize("evil", ["../evil.jpg", "oxbuild_images/../../evil.jpg", "/tmp/evil.jpg"])
def test_path_traversal_member_refused(server, tmp_path: Path, evil: str) -> None:
    gnd, images = SOURCES["roxford5k"]
    server.files[_path(gnd)] = _roxford_gnd(["a"], ["b"])
    server.files[_path(images)] = _tgz({"oxbuild_images/a.jpg": b"a", evil: b"evil", "oxbuild_images/b.jpg": b"b"})
    root = tmp_path / "data"
    with pytest.raises(ValueError, match="refusing member"):
        download_dataset("roxford5k", root, base_url=_base(server), progress=False)
    assert not (root / "roxford5k" / "jpg").exists()  # the member before the bad one did not land either
    assert not list(tmp_path.rglob("evil.jpg"))
    assert not list((root / "_downloads").glob("*.unpack"))
    assert not (root / "_downloads" / "roxford5k" / "oxbuild_images-v1.tgz.complete").exists()


def test_zip_traversal_member_refused(server, tmp_path: Path) -> None:
    _serve_coil(server, _zip({"coil-20-proc/obj1__0.png": b"x", "../obj1__1.png": b"evil"}))
    with pytest.raises(ValueError, match="refusing member"):
        download_dataset("coil20", tmp_path / "data", base_url=_base(server), progress=False)
    assert not (tmp_path / "data" / "coil20").exists()
    assert not (tmp_path / "obj1__1.png").exists()


def test_rerun_skips_completed_archives(server, tmp_path: Path) -> None:
    path = _serve_coil(server)
    download_dataset("coil20", tmp_path, base_url=_base(server), progress=False)
    assert len(server.log) == 1
    del server.files[path]  # a second run must not touch the network
    download_dataset("coil20", tmp_path, base_url=_base(server), progress=False)
    assert len(server.log) == 1


def test_sources_table_shape() -> None:
    assert set(SOURCES) >= {"roxford5k", "rparis6k", "oxford5k", "paris6k", "revisitop1m", "ukbench", "coil20"}
    r1m = SOURCES["revisitop1m"]
    assert len(r1m) == 101 and r1m[0].filename == "revisitop1m.txt" and r1m[-1].filename == "revisitop1m.100.tar.gz"
    for archives in SOURCES.values():
        assert len({a.filename for a in archives}) == len(archives)
    with pytest.raises(KeyError, match="no download source"):
        download_dataset("nope", Path("/nonexistent"))


def test_download_command(server, tmp_path: Path, capsys) -> None:
    from retrbench.cli import main

    _serve_coil(server)
    assert main(["download", "coil20", "--data-root", str(tmp_path), "--base-url", _base(server)]) == 0
    assert capsys.readouterr().out.strip() == f"coil20: ready under {tmp_path}"
    assert len(load_dataset("coil20", tmp_path).images) == 144
