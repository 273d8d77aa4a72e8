"""Oxford / Paris loaders on tiny folders in the public layouts, plus the real ground truth."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

from retrbench.datasets import DATASETS, UnsafePickleError
from retrbench.datasets.oxford import PARIS_CORRUPT, load_classic, load_revisited


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg_bytes()

# Real Oxford names (from the public ground truth), used as plain strings.
DB = [
    "ashmolean_000283",
    "oxford_002124",
    "radcliffe_camera_000158",
    "all_souls_000051",
    "oxford_002985",
    "keble_000245",
]
QUERIES = ["all_souls_000013", "all_souls_000026"]


def _write_jpgs(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / f"{n}.jpg").write_bytes(JPEG)


def _revisited_gnd() -> dict:
    return {
        "imlist": list(DB),
        "qimlist": list(QUERIES),
        "gnd": [
            {"bbx": [136.5, 34.1, 648.5, 955.7], "easy": [0, 1], "hard": np.array([2]), "junk": [3]},
            {"bbx": np.array([1, 2, 7, 8]), "easy": [4], "hard": [], "junk": [5, 0]},
        ],
    }


def _make_revisited(root: Path, name: str = "roxford5k", images: bool = True) -> Path:
    ddir = root / name
    ddir.mkdir(parents=True)
    (ddir / f"gnd_{name}.pkl").write_bytes(pickle.dumps(_revisited_gnd()))
    if images:
        _write_jpgs(ddir / "jpg", DB + QUERIES)
    return ddir


def _names(ds, q: int, key: str) -> list[str]:
    return [ds.images[i] for i in ds.gnd[q][key]]


# ----------------------------------------------------------------------------- revisited


def test_revisited_layout(tmp_path: Path) -> None:
    ddir = _make_revisited(tmp_path)
    ds = DATASETS.create("roxford", data_root=tmp_path)
    assert ds.name == "roxford5k" and ds.protocol == "revisited"
    assert ds.root == ddir / "jpg"
    assert ds.images == tuple(f"{n}.jpg" for n in DB)
    assert [q.image for q in ds.queries] == [f"{n}.jpg" for n in QUERIES]
    assert ds.queries[0].bbox == (136.5, 34.1, 648.5, 955.7)
    assert ds.queries[1].bbox == (1.0, 2.0, 7.0, 8.0) and all(isinstance(v, float) for v in ds.queries[1].bbox)
    assert set(ds.gnd[0]) == {"easy", "hard", "junk"}
    assert all(v.dtype == np.int64 for g in ds.gnd for v in g.values())
    assert ds.gnd[1]["junk"].tolist() == [5, 0] and ds.gnd[1]["hard"].size == 0
    assert all((ds.root / p).is_file() for p in ds.images)
    assert "cropped" in ds.notes["query_crop"] and ds.notes["query_in_database"].startswith("no")
    assert ds.notes["images"].startswith("6 ") and "md5" in ds.notes["ground_truth"]


def test_rparis_alias_and_default_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _make_revisited(tmp_path, "rparis6k")
    monkeypatch.setenv("RETRBENCH_DATA", str(tmp_path))
    ds = DATASETS.create("rparis")
    assert ds.name == "rparis6k" and len(ds.images) == 6 and len(ds.queries) == 2


def test_missing_gnd_names_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"gnd_roxford5k\.pkl.*revisitop layout"):
        load_revisited("roxford5k", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"gnd_oxford5k\.pkl.*groundtruth"):
        load_classic("oxford5k", tmp_path)


def test_missing_images_error_counts_and_names(tmp_path: Path) -> None:
    ddir = _make_revisited(tmp_path)
    (ddir / "jpg" / "oxford_002124.jpg").unlink()
    (ddir / "jpg" / "keble_000245.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 of 8 images are missing.*oxford_002124\.jpg, keble_000245\.jpg"):
        load_revisited("roxford5k", tmp_path)


def test_allow_missing_reindexes_to_same_names(tmp_path: Path) -> None:
    ddir = _make_revisited(tmp_path)
    full = load_revisited("roxford5k", tmp_path)
    gone = {"oxford_002124.jpg", "all_souls_000051.jpg"}
    for n in gone:
        (ddir / "jpg" / n).unlink()
    ds = load_revisited("roxford5k", tmp_path, allow_missing=True)
    assert ds.images == tuple(p for p in full.images if p not in gone)
    for q in range(2):
        for key in ("easy", "hard", "junk"):
            assert _names(ds, q, key) == [n for n in _names(full, q, key) if n not in gone]
    assert "dropped 2 of 6 database images and 0 of 2 queries" in ds.notes["missing"]


def test_allow_missing_drops_query_without_image(tmp_path: Path) -> None:
    ddir = _make_revisited(tmp_path)
    (ddir / "jpg" / "all_souls_000013.jpg").unlink()
    ds = load_revisited("roxford5k", tmp_path, allow_missing=True)
    assert [q.image for q in ds.queries] == ["all_souls_000026.jpg"]
    assert _names(ds, 0, "easy") == ["oxford_002985.jpg"]
    assert ds.notes["queries"].startswith("1 ")


def test_check_images_false_reads_ground_truth_only(tmp_path: Path) -> None:
    _make_revisited(tmp_path, images=False)
    with pytest.raises(FileNotFoundError, match="8 of 8"):
        load_revisited("roxford5k", tmp_path)
    ds = load_revisited("roxford5k", tmp_path, check_images=False)
    assert len(ds.images) == 6 and len(ds.queries) == 2 and "images_checked" in ds.notes


def test_images_in_subfolders(tmp_path: Path) -> None:
    ddir = _make_revisited(tmp_path, images=False)
    for n in DB + QUERIES:
        _write_jpgs(ddir / "jpg" / "oxford" / n.rsplit("_", 1)[0], [n])
    ds = load_revisited("roxford5k", tmp_path)
    assert ds.images[0] == "oxford/ashmolean/ashmolean_000283.jpg"
    assert ds.queries[0].image == "oxford/all_souls/all_souls_000013.jpg"
    assert all((ds.root / p).is_file() for p in ds.images)


def test_out_of_range_index_rejected(tmp_path: Path) -> None:
    ddir = _make_revisited(tmp_path)
    data = _revisited_gnd()
    data["gnd"][0]["easy"] = [0, 6]
    (ddir / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(data))
    with pytest.raises(ValueError, match="out of range"):
        load_revisited("roxford5k", tmp_path)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["roxford5k", "oxford5k"])
def test_code_executing_pickle_refused(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    ddir = tmp_path / name
    ddir.mkdir()
    (ddir / f"gnd_{name}.pkl").write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Evil(marker)]}))
    with pytest.raises(UnsafePickleError, match="system"):
        DATASETS.create(name, data_root=tmp_path)
    assert not marker.exists()


# ----------------------------------------------------------------------------- classic

CLASSIC_DB = sorted(DB + QUERIES)


def _classic_gnd() -> dict:
    """Two queries in the database (their own positive), over CLASSIC_DB in an unsorted order."""
    imlist = list(reversed(CLASSIC_DB))
    pos = {n: i for i, n in enumerate(imlist)}
    return {
        "imlist": imlist,
        "qimlist": list(QUERIES),
        "qidx": [pos[q] for q in QUERIES],
        "gnd": [
            {
                "bbx": [136.5, 34.1, 648.5, 955.7],
                "ok": [pos["all_souls_000013"], pos["all_souls_000051"]],
                "junk": [pos["oxford_002124"]],
            },
            {"bbx": [1, 2, 7, 8], "ok": [pos["all_souls_000026"], pos["oxford_002985"]], "junk": []},
        ],
    }


def _write_lists(gt_dir: Path, prefix: str = "oxc1_") -> None:
    """The same ground truth as _classic_gnd in the original Oxford list-file format."""
    gt_dir.mkdir(parents=True)
    files = {
        "all_souls_1_query.txt": f"{prefix}all_souls_000013 136.5 34.1 648.5 955.7\n",
        "all_souls_1_good.txt": "all_souls_000013\n",
        "all_souls_1_ok.txt": "all_souls_000051\n",
        "all_souls_1_junk.txt": "oxford_002124\n",
        "all_souls_2_query.txt": f"{prefix}all_souls_000026 1.000000 2.000000 7.000000 8.000000\n",
        "all_souls_2_good.txt": "all_souls_000026\noxford_002985\n",
        "all_souls_2_ok.txt": "",
        "all_souls_2_junk.txt": "",
    }
    for fn, text in files.items():
        (gt_dir / fn).write_text(text)


def test_classic_pickle_queries_stay_in_database(tmp_path: Path) -> None:
    ddir = tmp_path / "oxford5k"
    ddir.mkdir()
    (ddir / "gnd_oxford5k.pkl").write_bytes(pickle.dumps(_classic_gnd()))
    _write_jpgs(ddir / "jpg", CLASSIC_DB)
    ds = DATASETS.create("oxford5k", data_root=tmp_path)
    assert ds.protocol == "classic" and set(ds.gnd[0]) == {"ok", "junk"}
    assert ds.images == tuple(f"{n}.jpg" for n in reversed(CLASSIC_DB))  # imlist order kept
    for q, query in enumerate(ds.queries):
        assert query.image in ds.images
        assert query.image in _names(ds, q, "ok")  # its own positive
    assert _names(ds, 0, "ok") == ["all_souls_000013.jpg", "all_souls_000051.jpg"]
    assert ds.queries[1].bbox == (1.0, 2.0, 7.0, 8.0)
    assert ds.notes["query_in_database"].startswith("yes")


def test_classic_pickle_allow_missing(tmp_path: Path) -> None:
    ddir = tmp_path / "paris6k"
    ddir.mkdir()
    (ddir / "gnd_paris6k.pkl").write_bytes(pickle.dumps(_classic_gnd()))
    _write_jpgs(ddir / "jpg", CLASSIC_DB)
    full = load_classic("paris6k", tmp_path)
    gone = {"all_souls_000013.jpg", "oxford_002124.jpg"}  # query 0's image and a junk image
    for n in gone:
        (ddir / "jpg" / n).unlink()
    with pytest.raises(FileNotFoundError, match="2 of 8 images"):
        load_classic("paris6k", tmp_path)
    ds = load_classic("paris6k", tmp_path, allow_missing=True)
    assert [q.image for q in ds.queries] == ["all_souls_000026.jpg"]
    assert _names(ds, 0, "ok") == _names(full, 1, "ok")
    assert "dropped 2 of 8 database images and 1 of 2 queries" in ds.notes["missing"]


def test_classic_lists_match_pickle(tmp_path: Path) -> None:
    from_pkl = tmp_path / "a" / "oxford5k"
    from_lists = tmp_path / "b" / "oxford5k"
    from_pkl.mkdir(parents=True)
    (from_pkl / "gnd_oxford5k.pkl").write_bytes(pickle.dumps(_classic_gnd()))
    _write_lists(from_lists / "groundtruth")
    for d in (from_pkl, from_lists):
        _write_jpgs(d / "jpg", CLASSIC_DB)
    a = load_classic("oxford5k", tmp_path / "a")
    b = load_classic("oxford5k", tmp_path / "b")
    assert b.images == tuple(f"{n}.jpg" for n in CLASSIC_DB)  # lists: sorted folder
    assert a.queries == b.queries
    for q in range(2):
        for key in ("ok", "junk"):
            assert sorted(_names(a, q, key)) == _names(b, q, key)
    assert "list files" in b.notes["ground_truth"]
    with pytest.raises(ValueError, match="check_images=False"):
        load_classic("oxford5k", tmp_path / "b", check_images=False)


def test_classic_lists_paris_subfolders_and_corrupt(tmp_path: Path) -> None:
    ddir = tmp_path / "paris6k"
    _write_lists(ddir / "groundtruth", prefix="")  # Paris query files have no oxc1_ prefix
    for n in CLASSIC_DB:
        _write_jpgs(ddir / "jpg" / "paris" / n.rsplit("_", 1)[0], [n])
    corrupt = sorted(PARIS_CORRUPT)[0]  # paris_louvre_000136, an HTML page in the real archive
    _write_jpgs(ddir / "jpg" / "paris" / "louvre", [corrupt])
    with open(ddir / "groundtruth" / "all_souls_1_junk.txt", "a") as f:
        f.write(corrupt + "\n")
    ds = load_classic("paris6k", tmp_path)
    assert len(ds.images) == len(CLASSIC_DB)
    assert ds.images[0] == "paris/all_souls/all_souls_000013.jpg"
    assert ds.queries[0].image == ds.images[0]
    assert _names(ds, 0, "junk") == ["paris/oxford/oxford_002124.jpg"]
    assert "1 on disk, 1 named" in ds.notes["corrupt"]
    kept = load_classic("paris6k", tmp_path, exclude_corrupt=False)
    assert f"paris/louvre/{corrupt}.jpg" in kept.images and "corrupt" not in kept.notes
    assert len(kept.gnd[0]["junk"]) == 2


def test_classic_lists_missing_references(tmp_path: Path) -> None:
    ddir = tmp_path / "oxford5k"
    _write_lists(ddir / "groundtruth")
    _write_jpgs(ddir / "jpg", [n for n in CLASSIC_DB if n not in ("oxford_002985", "all_souls_000013")])
    with pytest.raises(FileNotFoundError, match=r"2 of 5 images are missing.*all_souls_000013\.jpg"):
        load_classic("oxford5k", tmp_path)
    ds = load_classic("oxford5k", tmp_path, allow_missing=True)
    assert [q.image for q in ds.queries] == ["all_souls_000026.jpg"]
    assert _names(ds, 0, "ok") == ["all_souls_000026.jpg"]
    assert "2 images named by the lists" in ds.notes["missing_references"]


# ----------------------------------------------------------------------------- real ground truth


def _link_gnd(tmp_path: Path, folder: str, name: str) -> Path:
    real = shared_path(folder, f"gnd_{name}.pkl")
    ddir = tmp_path / name
    ddir.mkdir()
    (ddir / f"gnd_{name}.pkl").symlink_to(real)
    return ddir


@pytest.mark.realdata
@pytest.mark.parametrize("name, n_images", [("roxford5k", 4993), ("rparis6k", 6322)])
def test_real_revisited_sizes(tmp_path: Path, name: str, n_images: int) -> None:
    _link_gnd(tmp_path, "revisitop", name)
    ds = DATASETS.create(name, data_root=tmp_path, check_images=False)
    assert (len(ds.images), len(ds.queries)) == (n_images, 70)
    assert not set(q.image for q in ds.queries) & set(ds.images)
    assert all(len(q.bbox) == 4 and q.bbox[0] < q.bbox[2] and q.bbox[1] < q.bbox[3] for q in ds.queries)
    assert all(len(g["easy"]) + len(g["hard"]) > 0 for g in ds.gnd)


@pytest.mark.realdata
@pytest.mark.parametrize("name, n_images", [("oxford5k", 5063), ("paris6k", 6392)])
def test_real_classic_sizes(tmp_path: Path, name: str, n_images: int) -> None:
    _link_gnd(tmp_path, "classic", name)
    ds = DATASETS.create(name, data_root=tmp_path, check_images=False)
    assert (len(ds.images), len(ds.queries)) == (n_images, 55)
    for q, g in zip(ds.queries, ds.gnd, strict=True):
        assert ds.images.index(q.image) in g["ok"]  # query is its own positive
    assert not {f"{n}.jpg" for n in PARIS_CORRUPT} & set(ds.images)


@pytest.mark.realdata
@pytest.mark.parametrize("classic, revisited", [("oxford5k", "roxford5k"), ("paris6k", "rparis6k")])
def test_real_revisited_is_classic_minus_queries(tmp_path: Path, classic: str, revisited: str) -> None:
    _link_gnd(tmp_path, "classic", classic)
    _link_gnd(tmp_path, "revisitop", revisited)
    c = load_classic(classic, tmp_path, check_images=False)
    r = load_revisited(revisited, tmp_path, check_images=False)
    rq = {q.image for q in r.queries}
    assert [p for p in c.images if p not in rq] == list(r.images)
    assert c.queries == r.queries[:55]


@pytest.mark.realdata
def test_real_oxford_images_with_allow_missing(tmp_path: Path) -> None:
    demo = shared_path("oxford-demo")
    ddir = _link_gnd(tmp_path, "classic", "oxford5k")
    (ddir / "jpg").mkdir()
    for p in sorted(demo.glob("*.jpg")):
        (ddir / "jpg" / p.name).symlink_to(p)
    ds = load_classic("oxford5k", tmp_path, allow_missing=True)
    assert len(ds.images) == 10 and len(ds.queries) == 10  # the demo images are all queries
    assert all((ds.root / p).is_file() for p in ds.images)
    full = load_classic("oxford5k", tmp_path, check_images=False)
    for q, g in zip(ds.queries, ds.gnd, strict=True):
        g_full = full.gnd[full.queries.index(q)]
        for key in ("ok", "junk"):
            assert [ds.images[i] for i in g[key]] == [
                full.images[i] for i in g_full[key] if full.images[i] in ds.images
            ]
    assert "dropped 5053 of 5063" in ds.notes["missing"]
