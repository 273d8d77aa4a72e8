"""retrbench.datasets.demo.build: validation, reuse, repair and atomic replacement of the folder.

The image generation is replaced by a few fixed files here (the mechanics without the seconds
of drawing); tests/datasets/demo/test_demo.py builds the real dataset.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from retrbench.datasets.demo import build
from retrbench.datasets.demo.catalogue import SOURCES

JPGS = [f"jpg/{c}.jpg" for c in "abcde"]


def _tiny_generate() -> tuple[dict[str, bytes], list[str]]:
    """A stand-in for :func:`build.generate`: five 'images' and the two label files."""
    files = {rel: bytes([i]) * 200 for i, rel in enumerate(JPGS)}
    return {**files, build.GND_FILE: b"g" * 200, "views.json": b"[]"}, ["coins"]


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Use the stand-in generation; the list counts its calls."""
    calls: list[int] = []
    monkeypatch.setattr(build, "generate", lambda: calls.append(1) or _tiny_generate())
    return calls


def test_build_writes_the_files_and_their_manifest(tmp_path: Path, tiny: list[int]) -> None:
    ddir = build.build_demo(tmp_path)
    assert ddir == tmp_path / build.DIRNAME and tiny == [1]
    files, _ = _tiny_generate()
    for rel, data in files.items():
        assert (ddir / rel).read_bytes() == data
    man = json.loads((ddir / "manifest.json").read_text())
    assert man == build.manifest(files, ["coins"])
    assert man["name"] == "demo" and man["version"] == build.VERSION and man["seed"] == build.SEED
    assert set(man["files"]) == set(files)
    assert [k for k, v in man["sources"].items() if not v["matches"]] == ["coins"]
    assert set(man["sources"]) == {s.key for s in SOURCES}
    # the usual permissions (not mkstemp's / mkdtemp's private ones)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((ddir / "jpg" / "a.jpg").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(ddir.stat().st_mode) == 0o755


def test_valid_folder_is_reused(tmp_path: Path, tiny: list[int]) -> None:
    ddir = build.build_demo(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in ddir.rglob("*")}
    assert build.build_demo(tmp_path) == ddir and tiny == [1]
    assert {p: p.stat().st_mtime_ns for p in ddir.rglob("*")} == before
    assert build.build_demo(tmp_path, force=True) == ddir and tiny == [1, 1]


def _damage(ddir: Path, damage: str) -> None:
    victim = sorted((ddir / "jpg").iterdir())[3]
    if damage == "truncate_jpg":
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "delete_jpg":
        victim.unlink()
    elif damage == "delete_gnd":
        (ddir / build.GND_FILE).unlink()
    elif damage == "no_manifest":
        (ddir / "manifest.json").unlink()
    elif damage == "bad_manifest":
        (ddir / "manifest.json").write_text("{not json")
    elif damage == "old_version":
        man = json.loads((ddir / "manifest.json").read_text())
        (ddir / "manifest.json").write_text(json.dumps({**man, "version": build.VERSION + 1}))


@pytest.mark.parametrize(
    "damage", ["truncate_jpg", "delete_jpg", "delete_gnd", "no_manifest", "bad_manifest", "old_version"]
)
def test_damage_is_detected(tmp_path: Path, tiny: list[int], damage: str) -> None:
    ddir = build.build_demo(tmp_path)
    assert build.is_valid(ddir)
    _damage(ddir, damage)
    assert not build.is_valid(ddir)


@pytest.mark.parametrize("damage", ["truncate_jpg", "delete_gnd", "no_manifest"])
def test_corrupt_folder_is_rebuilt(tmp_path: Path, tiny: list[int], damage: str) -> None:
    ddir = build.build_demo(tmp_path)
    (ddir / "jpg" / "extra.jpg").write_bytes(b"x")  # not in the manifest: must not survive a rebuild
    _damage(ddir, damage)
    assert build.build_demo(tmp_path) == ddir
    assert tiny == [1, 1] and build.is_valid(ddir)
    assert sorted(p.name for p in (ddir / "jpg").iterdir()) == [Path(p).name for p in JPGS]
    assert [p.name for p in tmp_path.iterdir()] == [build.DIRNAME]  # old and temporary folders removed


@pytest.mark.parametrize("start", ["empty_dir", "stray_file", "valid"])
def test_replacement_is_atomic_and_complete(tmp_path: Path, tiny: list[int], start: str) -> None:
    ddir = tmp_path / build.DIRNAME
    if start == "empty_dir":
        ddir.mkdir()
    elif start == "stray_file":
        (ddir / "jpg").mkdir(parents=True)
        (ddir / "jpg" / "half-written.jpg").write_bytes(b"x")
    else:
        build.build_demo(tmp_path)
        (ddir / "jpg" / "stale.jpg").write_bytes(b"x")  # not in the manifest
        assert build.is_valid(ddir)  # files beyond the manifest do not invalidate a folder ...
    assert build.build_demo(tmp_path, force=start == "valid") == ddir  # ... but force rebuilds it
    assert build.is_valid(ddir)
    files = sorted(p.relative_to(ddir).as_posix() for p in ddir.rglob("*") if p.is_file())
    assert files == sorted([build.GND_FILE, *JPGS, "manifest.json", "views.json"])
    assert [p.name for p in tmp_path.iterdir()] == [build.DIRNAME]


def test_failed_generation_leaves_the_old_folder(
    tmp_path: Path, tiny: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    ddir = build.build_demo(tmp_path)
    _damage(ddir, "truncate_jpg")

    def boom() -> None:
        raise RuntimeError("interrupted")

    monkeypatch.setattr(build, "atomic_write_bytes", lambda *a: boom())
    with pytest.raises(RuntimeError, match="interrupted"):
        build.build_demo(tmp_path)
    assert (ddir / "jpg" / "d.jpg").stat().st_size == 100  # untouched: the damaged folder is still there
    assert [p.name for p in tmp_path.iterdir()] == [build.DIRNAME]  # the temporary folder is gone
