"""retrbench.datasets._common: helpers shared by the loaders, on hand-built inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retrbench.datasets import _common
from retrbench.types import Query


def test_resolve_data_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RETRBENCH_DATA", str(tmp_path / "env"))
    assert _common.resolve_data_root(None) == tmp_path / "env"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _common.resolve_data_root("~/d") == tmp_path / "d"
    assert _common.resolve_data_root(tmp_path / "x") == tmp_path / "x"


def test_preview_and_md5(tmp_path: Path) -> None:
    assert _common.preview(["a", "b"]) == "a, b"
    assert _common.preview(f"n{i}" for i in range(7)) == "n0, n1, n2, n3, n4, ..."
    (tmp_path / "f").write_bytes(b"abc")
    assert _common.md5_file(tmp_path / "f") == "900150983cd24fb0d6963f7d28e17f72"  # md5("abc"), RFC 1321


def test_as_bbox() -> None:
    assert _common.as_bbox(np.array([[1, 2, 3, 4]]), "w") == (1.0, 2.0, 3.0, 4.0)
    with pytest.raises(ValueError, match="w: expected a 4-value box"):
        _common.as_bbox([1, 2, 3], "w")


def test_build_dataset_drops_and_reindexes() -> None:
    # database a b c d, b is missing; queries q0 (positives a c, junk d) and q1 (missing)
    gnd = [{"ok": np.array([0, 2]), "junk": np.array([3, 1])}, {"ok": np.array([1]), "junk": np.array([], np.int64)}]
    notes: dict[str, str] = {}
    ds = _common.build_dataset(
        "x",
        "map",
        Path("/r"),
        db_paths=["a", "b", "c", "d"],
        keep_db=np.array([True, False, True, True]),
        queries=[Query("q0"), Query("q1")],
        keep_q=np.array([True, False]),
        gnd=gnd,
        notes=notes,
    )
    assert ds.images == ("a", "c", "d") and [q.image for q in ds.queries] == ["q0"]
    assert ds.gnd[0]["ok"].tolist() == [0, 1] and ds.gnd[0]["junk"].tolist() == [2]
    assert notes is ds.notes and notes["images"] == "3 database images" and notes["queries"] == "1 queries"
    assert notes["missing"].startswith("allow_missing: dropped 1 of 4 database images and 1 of 2 queries")


def test_build_dataset_without_drops_adds_no_missing_note() -> None:
    ds = _common.build_dataset(
        "x",
        "map",
        Path("/r"),
        db_paths=["a"],
        keep_db=np.array([True]),
        queries=[Query("q")],
        keep_q=np.array([True]),
        gnd=[{"ok": np.array([0]), "junk": np.array([], np.int64)}],
        notes={},
    )
    assert "missing" not in ds.notes and ds.gnd[0]["ok"].tolist() == [0]


@pytest.mark.parametrize("stat_limit", [_common.STAT_LIMIT, 0])  # one stat per file / list the folders
def test_existing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stat_limit: int) -> None:
    for p in ["b/2.JPG", "b/1.jpeg", "a.png", "c/z.txt"]:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(b"")
    monkeypatch.setattr(_common, "STAT_LIMIT", stat_limit)
    paths = ["a.png", "b/1.jpeg", "b/3.jpg", "nodir/x.jpg", "b", "c/z.txt", "a.png/x"]
    got = _common.existing_files(tmp_path, paths)
    assert got.dtype == bool and got.tolist() == [True, True, False, False, False, True, False]
