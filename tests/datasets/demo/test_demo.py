"""The built-in ``demo`` dataset as loaded: layout, ground truth, labels, determinism, registry entry."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrbench.datasets import DATASETS, demo, load_gnd_pickle
from retrbench.datasets.demo import build, render
from retrbench.types import RetrievalDataset

N_DB = len(demo.INSTANCES) * len(render.RECIPES) + sum(n for _, _, n in demo.DISTRACTORS)
N_Q = 2 * len(demo.INSTANCES)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build shared by the read-only tests (a data root holding ``demo-v1``)."""
    root = tmp_path_factory.mktemp("demo-root")
    demo.build_demo(root)
    return root


@pytest.fixture(scope="module")
def ds(built: Path) -> RetrievalDataset:
    return demo.load_demo(built)


@pytest.fixture(scope="module")
def views(built: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((built / demo.DIRNAME / "views.json").read_text())}


def _copy(src_root: Path, dst_root: Path) -> Path:
    shutil.copytree(src_root / demo.DIRNAME, dst_root / demo.DIRNAME)
    return dst_root / demo.DIRNAME


# ----------------------------------------------------------------------------- layout


def test_layout_and_counts(built: Path, ds: RetrievalDataset) -> None:
    ddir = built / demo.DIRNAME
    assert {p.name for p in ddir.iterdir()} == {"jpg", demo.GND_FILE, "views.json", "manifest.json"}
    assert not [p for p in built.iterdir() if p.name != demo.DIRNAME]  # no temporary folders left
    assert len(ds.images) == N_DB and len(ds.queries) == N_Q and len(ds.gnd) == N_Q
    assert (N_DB, N_Q) == (197, 28)  # as the module docstring says
    assert ds.name == "demo" and ds.protocol == "revisited" and ds.root == ddir / "jpg"
    assert len(set(ds.images)) == N_DB
    assert not {q.image for q in ds.queries} & set(ds.images)  # queries are not in the database
    assert {p.name for p in (ddir / "jpg").iterdir()} == set(ds.images) | {q.image for q in ds.queries}
    assert "query_cropping" in ds.notes


def test_images_are_small_rgb_jpegs(ds: RetrievalDataset) -> None:
    for name in (*ds.images, *(q.image for q in ds.queries)):
        with Image.open(ds.root / name) as im:
            assert im.format == "JPEG" and im.mode == "RGB", name
            assert 384 <= max(im.size) <= 512, (name, im.size)
            assert not im.info.get("exif"), name


def test_pickle_has_the_revisitop_structure(built: Path, ds: RetrievalDataset) -> None:
    data = load_gnd_pickle(built / demo.DIRNAME / demo.GND_FILE)  # restricted unpickler
    assert set(data) == {"imlist", "qimlist", "gnd"}
    assert [f"{n}.jpg" for n in data["imlist"]] == list(ds.images)
    assert [f"{n}.jpg" for n in data["qimlist"]] == [q.image for q in ds.queries]
    for g in data["gnd"]:
        assert set(g) == {"easy", "hard", "junk", "bbx"}
        assert all(isinstance(i, int) for k in ("easy", "hard", "junk") for i in g[k])
        assert len(g["bbx"]) == 4 and all(isinstance(v, float) for v in g["bbx"])


# ----------------------------------------------------------------------------- ground truth


def test_gnd_indices_valid_disjoint_and_nonempty(ds: RetrievalDataset) -> None:
    n = len(ds.images)
    for q, g in zip(ds.queries, ds.gnd, strict=True):
        for k in ("easy", "hard", "junk"):
            assert g[k].dtype == np.int64 and g[k].ndim == 1
            assert ((g[k] >= 0) & (g[k] < n)).all()
            assert len(np.unique(g[k])) == len(g[k])
        assert not set(g["easy"].tolist()) & set(g["hard"].tolist())
        assert not set(g["easy"].tolist()) & set(g["junk"].tolist())
        assert not set(g["hard"].tolist()) & set(g["junk"].tolist())
        assert len(g["easy"]) >= 1 and len(g["hard"]) >= 1, q.image
    assert sum(len(g["junk"]) for g in ds.gnd) >= 1


def test_query_boxes_inside_their_images(ds: RetrievalDataset) -> None:
    for q in ds.queries:
        with Image.open(ds.root / q.image) as im:
            w, h = im.size
        assert q.bbox is not None
        x0, y0, x1, y1 = q.bbox
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (q.image, q.bbox, (w, h))
        assert (x1 - x0) * (y1 - y0) >= 0.1 * w * h  # the object is a real part of the query


def test_labels_follow_the_documented_rules(ds: RetrievalDataset, views: dict[str, dict]) -> None:
    for q, g in zip(ds.queries, ds.gnd, strict=True):
        qv = views[q.image[:-4]]
        assert qv["visible"] >= 0.99  # a query shows all of its object
        label = {int(i): k for k in ("easy", "hard", "junk") for i in g[k]}
        for row, name in enumerate(ds.images):
            v = views[name[:-4]]
            if v["instance"] != qv["instance"]:
                assert row not in label  # other instances and distractors are negatives
                continue
            rot = abs((v["angle"] - qv["angle"] + 180.0) % 360.0 - 180.0)
            if v["visible"] < demo.JUNK_VISIBLE:
                want = "junk"
            elif (
                v["visible"] < demo.HARD_VISIBLE
                or rot > demo.HARD_ROTATION
                or v["tilt"] > demo.HARD_TILT
                or v["cover"] < demo.HARD_COVER
            ):
                want = "hard"
            else:
                want = "easy"
            assert label[row] == want, (q.image, name, v)


def test_random_descriptors_score_near_chance(ds: RetrievalDataset) -> None:
    evaluation = pytest.importorskip("retrbench.evaluation")
    rng = np.random.default_rng(0)
    db = rng.standard_normal((len(ds.images), 64)).astype(np.float32)
    qs = rng.standard_normal((len(ds.queries), 64)).astype(np.float32)
    ranks = np.argsort(-(qs @ db.T), axis=1, kind="stable")
    got = {m.split: m.value for m in evaluation.evaluate(ranks, ds.gnd, "revisited") if m.name == "mAP"}
    assert set(got) == {"easy", "medium", "hard"}
    assert all(v < 20.0 for v in got.values()), got
    # and the ground truth is reachable: ranking each query's positives first scores 100
    perfect = [
        np.r_[g["easy"], g["hard"], np.setdiff1d(np.arange(len(ds.images)), np.r_[g["easy"], g["hard"]])]
        for g in ds.gnd
    ]
    top = {m.split: m.value for m in evaluation.evaluate(np.stack(perfect), ds.gnd, "revisited") if m.name == "mAP"}
    assert top["medium"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- determinism and the registry entry

# sha256 of the label files of demo-v1 as designed (numpy PCG64 streams and geometry only: no
# Pillow encoding is involved, unlike the JPEG bytes). A change here changes every number.
GND_SHA256 = "f497bc607439f4052f161ad2d78c0c34bf19d4f953c0fe0fc1c23055541734c9"
VIEWS_SHA256 = "1efd333c33e9bad5e447105da144b3db4f1c1d47c9b0c3f394868d380c06988b"


def _manifest_bytes(ddir: Path) -> bytes:
    return (ddir / "manifest.json").read_bytes()


def test_two_builds_are_identical(built: Path, tmp_path: Path) -> None:
    other = demo.build_demo(tmp_path)
    assert _manifest_bytes(other) == _manifest_bytes(built / demo.DIRNAME)
    man = json.loads(_manifest_bytes(other))
    assert man["version"] == demo.VERSION and len(man["files"]) == N_DB + N_Q + 2
    assert set(man["sources"]) == {s.key for s in demo.SOURCES}
    assert demo.is_valid(other)


def test_ground_truth_and_views_are_the_designed_ones(built: Path) -> None:
    man = json.loads(_manifest_bytes(built / demo.DIRNAME))
    differ = [k for k, v in man["sources"].items() if not v["matches"]]
    if differ:
        pytest.skip(f"installed package photos differ from the designed ones: {differ}")
    assert man["files"][demo.GND_FILE] == GND_SHA256
    assert man["files"]["views.json"] == VIEWS_SHA256


def test_valid_folder_is_reused_not_rebuilt(built: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ddir = _copy(built, tmp_path)
    before = {p: p.stat().st_mtime_ns for p in ddir.rglob("*")}

    def fail() -> None:
        raise AssertionError("rebuilt a valid demo folder")

    monkeypatch.setattr(build, "generate", fail)
    assert demo.build_demo(tmp_path) == ddir
    assert DATASETS.create("demo", data_root=tmp_path).root == ddir / "jpg"
    assert {p: p.stat().st_mtime_ns for p in ddir.rglob("*")} == before


def test_registry_entry_and_default_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built: Path) -> None:
    entry = DATASETS.get("demo")
    assert entry.info.protocol == "revisited" and "demo-v1" in entry.info.layout
    _copy(built, tmp_path)
    monkeypatch.setenv("RETRBENCH_DATA", str(tmp_path))
    loaded = DATASETS.create("demo")
    assert loaded.root == tmp_path / demo.DIRNAME / "jpg"
    assert os.path.isfile(loaded.root / loaded.images[0])
