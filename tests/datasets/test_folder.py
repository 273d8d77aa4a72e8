"""``folder:PATH`` datasets: a folder of images and a CSV / JSON ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrbench.datasets import DATASETS, load_dataset
from retrbench.datasets.folder import load_folder, scan_images

DB = ["db/eiffel_07.jpg", "db/eiffel_11.jpg", "db/eiffel_blur.jpg", "db/louvre_02.jpg", "db/other.png"]
Q = ["q/eiffel_1.jpg", "q/louvre_1.jpg"]

CSV = """query,positive,junk,box
q/eiffel_1.jpg,db/eiffel_07.jpg,,12 30 40 38
q/eiffel_1.jpg,db/eiffel_11.jpg,db/eiffel_blur.jpg,
q/louvre_1.jpg,db/louvre_02.jpg,,
"""


def _img(path: Path, size: tuple[int, int] = (64, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 100, 50)).save(path)


def _make(root: Path, gt: str | None = CSV, name: str = "groundtruth.csv") -> Path:
    for p in DB + Q:
        _img(root / p)
    if gt is not None:
        (root / name).write_text(gt)
    return root


def _names(ds, q: int, key: str) -> list[str]:
    return [ds.images[i] for i in ds.gnd[q][key]]


def test_csv_separate_queries_leave_the_database(tmp_path: Path) -> None:
    _make(tmp_path)
    (tmp_path / ".hidden.jpg").write_bytes(b"")  # hidden files and non-images are not database images
    (tmp_path / "notes.txt").write_text("x")
    ds = load_folder(tmp_path)
    assert ds.protocol == "map" and ds.root == tmp_path and ds.name == f"folder:{tmp_path.name}"
    assert ds.images == tuple(sorted(DB))  # the queries are named by no entry: automatic -> out
    assert [q.image for q in ds.queries] == Q
    assert ds.queries[0].bbox == (12.0, 30.0, 40.0, 38.0) and ds.queries[1].bbox is None
    assert _names(ds, 0, "ok") == ["db/eiffel_07.jpg", "db/eiffel_11.jpg"]
    assert _names(ds, 0, "junk") == ["db/eiffel_blur.jpg"]
    assert _names(ds, 1, "ok") == ["db/louvre_02.jpg"] and ds.gnd[1]["junk"].size == 0
    assert all(v.dtype == np.int64 for g in ds.gnd for v in g.values())
    assert "0 of 2 query images stay" in ds.notes["query_in_database"] and "md5" in ds.notes["ground_truth"]


def test_queries_in_db_true_makes_them_junk_for_themselves(tmp_path: Path) -> None:
    _make(tmp_path)
    ds = load_folder(tmp_path, queries_in_db=True)
    assert ds.images == tuple(sorted(DB + Q))
    assert _names(ds, 0, "junk") == ["db/eiffel_blur.jpg", "q/eiffel_1.jpg"]
    assert _names(ds, 1, "junk") == ["q/louvre_1.jpg"]
    assert "2 of 2 query images stay" in ds.notes["query_in_database"]


def test_all_vs_all_groups_keep_queries_in_database(tmp_path: Path) -> None:
    """Every image is a query; the other images of its group are its positives (self listed too)."""
    groups = [["a/1.jpg", "a/2.jpg", "a/3.jpg"], ["b/1.jpg", "b/2.jpg"]]
    for g in groups:
        for p in g:
            _img(tmp_path / p)
    rows = ["query,positive"] + [f"{q},{p}" for g in groups for q in g for p in g]  # includes q,q
    (tmp_path / "groundtruth.csv").write_text("\n".join(rows) + "\n")
    ds = load_folder(tmp_path)
    flat = [p for g in groups for p in g]
    assert ds.images == tuple(flat) and [q.image for q in ds.queries] == flat
    for qi, q in enumerate(flat):
        group = next(g for g in groups if q in g)
        assert _names(ds, qi, "ok") == [p for p in group if p != q]
        assert _names(ds, qi, "junk") == [q]
    assert "5 queries listed themselves" in ds.notes["self_positives"]
    with pytest.raises(ValueError, match="queries_in_db=False.*5 of them are positives"):
        load_folder(tmp_path, queries_in_db=False)


def test_self_match_is_not_counted(tmp_path: Path) -> None:
    evaluation = pytest.importorskip("retrbench.evaluation")
    groups = [["a/1.jpg", "a/2.jpg"], ["b/1.jpg", "b/2.jpg"]]
    for g in groups:
        for p in g:
            _img(tmp_path / p)
    rows = ["query,positive"] + [f"{q},{p}" for g in groups for q in g for p in g if p != q]
    (tmp_path / "groundtruth.csv").write_text("\n".join(rows) + "\n")
    ds = load_folder(tmp_path)
    # each query ranks itself first, then its partner: perfect once the self-match is junk
    ranks = np.array([[0, 1, 2, 3], [1, 0, 2, 3], [2, 3, 0, 1], [3, 2, 0, 1]])
    m = {x.name: x.value for x in evaluation.evaluate(ranks, ds.gnd, "map")}
    assert m["mAP"] == pytest.approx(100.0) and m["R@1"] == pytest.approx(100.0)


def test_json_equals_csv(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _make(a)
    entries = [
        {
            "query": "q/eiffel_1.jpg",
            "positive": ["db/eiffel_07.jpg", "db/eiffel_11.jpg"],
            "junk": ["db/eiffel_blur.jpg"],
            "box": [12, 30, 40, 38],
        },
        {"query": "q/louvre_1.jpg", "positive": "db/louvre_02.jpg"},
    ]
    _make(b, json.dumps({"queries": entries}), "groundtruth.json")
    da, db = load_folder(a), load_folder(b)
    assert da.images == db.images and da.queries == db.queries
    for ga, gb in zip(da.gnd, db.gnd, strict=True):
        assert all(ga[k].tolist() == gb[k].tolist() for k in ("ok", "junk"))
    (b / "groundtruth.csv").write_text(CSV)
    with pytest.raises(ValueError, match="both groundtruth.csv and groundtruth.json"):
        load_folder(b)
    assert len(load_folder(b, gt=b / "groundtruth.json").queries) == 2


def test_bare_file_names_and_ambiguity(tmp_path: Path) -> None:
    _make(tmp_path, "query,positive\neiffel_1.jpg,eiffel_07.jpg\n")
    ds = load_folder(tmp_path)
    assert ds.queries[0].image == "q/eiffel_1.jpg" and _names(ds, 0, "ok") == ["db/eiffel_07.jpg"]
    _img(tmp_path / "other" / "eiffel_07.jpg")
    with pytest.raises(ValueError, match=r"row 2: image name 'eiffel_07\.jpg' is ambiguous"):
        load_folder(tmp_path)


def test_unknown_names_error_and_allow_missing(tmp_path: Path) -> None:
    gt = CSV + "q/gone.jpg,db/louvre_02.jpg,,\nq/louvre_1.jpg,db/nope.jpg,,\n"
    _make(tmp_path, gt)
    with pytest.raises(
        FileNotFoundError, match=r"2 ground-truth names.*'q/gone\.jpg' \(query, .*groundtruth\.csv row 5\)"
    ):
        load_folder(tmp_path)
    ds = load_folder(tmp_path, allow_missing=True)
    assert [q.image for q in ds.queries] == Q
    assert _names(ds, 1, "ok") == ["db/louvre_02.jpg"]
    assert "2 ground-truth names not found were dropped (1 queries)" in ds.notes["missing"]


@pytest.mark.parametrize(
    "row, match",
    [
        ("q/eiffel_1.jpg,db/eiffel_07.jpg,,40 30 12 38", r"row 2: bad box.*x0 < x1"),
        ("q/eiffel_1.jpg,db/eiffel_07.jpg,,1 2 3", "row 2: box must be 4"),
        ("q/eiffel_1.jpg,db/eiffel_07.jpg,,a b c d", "row 2: box must be 4"),
        ("q/eiffel_1.jpg,db/eiffel_07.jpg,,0 0 65 10", r"row 2: box .* exceeds the image \(64 x 48"),
        ("q/eiffel_1.jpg,db/eiffel_07.jpg,db/eiffel_07.jpg,", "row 2: .*both positive and junk"),
        ("q/eiffel_1.jpg,db/eiffel_07.jpg,,,extra", "row 2: 5 fields for 4 columns"),
        (",db/eiffel_07.jpg,,", "row 2: empty query"),
    ],
)
def test_malformed_rows(tmp_path: Path, row: str, match: str) -> None:
    _make(tmp_path, "query,positive,junk,box\n" + row + "\n")
    with pytest.raises(ValueError, match=match):
        load_folder(tmp_path)


def test_header_and_conflicting_boxes(tmp_path: Path) -> None:
    _make(tmp_path, "image,match\nq/eiffel_1.jpg,db/eiffel_07.jpg\n")
    with pytest.raises(ValueError, match=r"row 1: header must name"):
        load_folder(tmp_path)
    _make(
        tmp_path,
        "query,positive,box\nq/eiffel_1.jpg,db/eiffel_07.jpg,1 2 3 4\nq/eiffel_1.jpg,db/eiffel_11.jpg,1 2 3 5\n",
    )
    with pytest.raises(ValueError, match=r"row 3: box .* differs from .* given on .*row 2"):
        load_folder(tmp_path)


def test_json_errors(tmp_path: Path) -> None:
    _make(tmp_path, '[{"query": "q/eiffel_1.jpg", "positives": []}]', "groundtruth.json")
    with pytest.raises(ValueError, match=r"entry 0: unknown keys \['positives'\]"):
        load_folder(tmp_path)
    (tmp_path / "groundtruth.json").write_text('[{"query": "q/eiffel_1.jpg", "box": [1, 2, 3]}]')
    with pytest.raises(ValueError, match="entry 0: box must be 4"):
        load_folder(tmp_path)
    (tmp_path / "groundtruth.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_folder(tmp_path)


def test_missing_folder_gt_or_images(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_folder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no ground truth \(groundtruth\.csv or groundtruth\.json\)"):
        load_folder(tmp_path)
    (tmp_path / "groundtruth.csv").write_text(CSV)
    with pytest.raises(FileNotFoundError, match="no images below"):
        load_folder(tmp_path)


def test_query_without_positive_is_noted(tmp_path: Path) -> None:
    _make(tmp_path, CSV + "q/louvre_1.jpg,,,\nq/eiffel_1.jpg,,,\ndb/other.png,,,\n")
    ds = load_folder(tmp_path)
    assert len(ds.queries) == 3 and ds.gnd[2]["ok"].size == 0
    assert "db/other.png" not in ds.images
    assert ds.notes["queries_without_positives"].startswith("1 ")


def test_scan_images(tmp_path: Path) -> None:
    for p in ["b/2.JPG", "b/1.jpeg", "a.png", ".git/x.jpg", "c/.d/y.jpg", "c/z.txt", ".hidden.png"]:
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_bytes(b"")
    assert scan_images(tmp_path) == ["a.png", "b/1.jpeg", "b/2.JPG"]


# ----------------------------------------------------------------------------- through the registry


def test_folder_resolver_builds_through_the_registry(tmp_path: Path) -> None:
    _make(tmp_path)
    name = f"folder:{tmp_path}"
    assert DATASETS.find_resolver(name) is not None and name not in DATASETS
    ds = DATASETS.create(name, data_root=tmp_path / "ignored")
    direct = load_folder(tmp_path)
    assert ds.name == direct.name == f"folder:{tmp_path.name}" and ds.protocol == "map"
    assert ds.images == direct.images and ds.queries == direct.queries
    assert [g["ok"].tolist() for g in ds.gnd] == [g["ok"].tolist() for g in direct.gnd]
    # options reach load_folder
    kept = DATASETS.create(name, queries_in_db=True)
    assert set(direct.images) < set(kept.images) and {q.image for q in kept.queries} <= set(kept.images)


def test_folder_resolver_options_and_errors(tmp_path: Path) -> None:
    _make(tmp_path, gt=None)
    (tmp_path / "other.csv").write_text(CSV)
    ds = load_dataset(f"folder:{tmp_path}", gt=tmp_path / "other.csv")
    assert len(ds.queries) == 2 and ds.notes["ground_truth"].startswith("other.csv md5 ")
    with pytest.raises(ValueError, match="does not take the option"):
        load_dataset(f"folder:{tmp_path}", gt=tmp_path / "other.csv", max_distractors=3)
    with pytest.raises(FileNotFoundError, match="no ground truth"):
        DATASETS.create(f"folder:{tmp_path}")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        DATASETS.create(f"folder:{tmp_path / 'nowhere'}")


# ----------------------------------------------------------------------------- encodings


@pytest.mark.parametrize("name", ["groundtruth.csv", "groundtruth.json"])
def test_ground_truth_not_utf8_names_file_offset_and_line(tmp_path: Path, name: str) -> None:
    # before: a bare UnicodeDecodeError ("'utf-8' codec can't decode byte 0xe9 in position 61")
    # that named neither the file nor the line
    text = CSV if name.endswith(".csv") else json.dumps([{"query": Q[0], "positive": [DB[0]]}], indent=1)
    _make(tmp_path, None)
    raw = text.encode().replace(b"eiffel_07", "eiffel_\u00e907".encode("latin-1"))  # Latin-1 é
    (tmp_path / name).write_bytes(raw)
    offset = raw.index(b"\xe9")
    with pytest.raises(ValueError) as err:
        load_folder(tmp_path)
    msg = str(err.value)
    line = raw[:offset].count(b"\n") + 1
    assert msg.startswith(f"{tmp_path / name}: not UTF-8 text: byte 0xe9 at byte offset {offset} (line {line}):")
    assert "save the ground-truth file as UTF-8" in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["groundtruth.csv", "groundtruth.json"])
def test_ground_truth_with_byte_order_mark(tmp_path: Path, name: str) -> None:
    text = CSV if name.endswith(".csv") else json.dumps([{"query": Q[0], "positive": [DB[0]]}])
    _make(tmp_path, None)
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    ds = load_folder(tmp_path)
    assert [q.image for q in ds.queries][0] == Q[0] and _names(ds, 0, "ok")[0] == DB[0]
