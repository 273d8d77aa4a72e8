"""rOxford / rParis + revisitop 1M distractors on a tiny built layout."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from retrbench.datasets import DATASETS
from retrbench.datasets.distractors import load_with_distractors, read_distractor_list
from retrbench.datasets.oxford import load_revisited

DB = ["all_souls_000051", "oxford_002985", "keble_000245"]
QUERIES = ["all_souls_000013"]
# revisitop1m.txt lines: sub-folders, with and without extension
LISTED = ["1/a/1a2b3c.jpg", "1/b/4d5e6f", "2/c/7a8b9c.jpg", "2/c/0f0e0d.jpg"]
FILES = ["1/a/1a2b3c.jpg", "1/b/4d5e6f.jpg", "2/c/7a8b9c.jpg", "2/c/0f0e0d.jpg"]


def _make(root: Path, name: str = "roxford5k", images: bool = True) -> None:
    ddir = root / name
    ddir.mkdir(parents=True)
    gnd = {
        "imlist": DB,
        "qimlist": QUERIES,
        "gnd": [{"bbx": [1.0, 2.0, 7.0, 8.0], "easy": [0], "hard": [2], "junk": [1]}],
    }
    (ddir / f"gnd_{name}.pkl").write_bytes(pickle.dumps(gnd))
    r1m = root / "revisitop1m"
    r1m.mkdir()
    (r1m / "revisitop1m.txt").write_text("\n".join(LISTED) + "\n\n")
    if images:
        for n in DB + QUERIES:
            (ddir / "jpg").mkdir(exist_ok=True)
            (ddir / "jpg" / f"{n}.jpg").write_bytes(b"jpg")
        for p in FILES:
            (r1m / "jpg" / p).parent.mkdir(parents=True, exist_ok=True)
            (r1m / "jpg" / p).write_bytes(b"jpg")


def test_base_then_distractors(tmp_path: Path) -> None:
    _make(tmp_path)
    base = load_revisited("roxford5k", tmp_path)
    ds = DATASETS.create("roxford5k+1m", data_root=tmp_path)
    assert ds.name == "roxford5k+1m" and ds.protocol == "revisited" and ds.root == tmp_path
    assert ds.images == tuple(f"roxford5k/jpg/{n}.jpg" for n in DB) + tuple(f"revisitop1m/jpg/{p}" for p in FILES)
    assert all((ds.root / p).is_file() for p in ds.images)
    assert [q.image for q in ds.queries] == ["roxford5k/jpg/all_souls_000013.jpg"]
    assert ds.queries[0].bbox == base.queries[0].bbox
    for key in ("easy", "hard", "junk"):  # ground truth unchanged: base indices first
        assert ds.gnd[0][key].tolist() == base.gnd[0][key].tolist()
    assert ds.notes["images"] == "7 database images: 3 roxford5k + 4 distractors"
    assert "all of the 4 listed (the full R1M list has 1001001)" in ds.notes["distractors"]
    assert ds.notes["query_crop"] == base.notes["query_crop"]


def test_max_distractors_and_alias(tmp_path: Path) -> None:
    _make(tmp_path, "rparis6k")
    ds = DATASETS.create("rparis+1m", data_root=tmp_path, max_distractors=2)
    assert ds.name == "rparis6k+1m" and len(ds.images) == 5
    assert ds.images[3:] == tuple(f"revisitop1m/jpg/{p}" for p in FILES[:2])
    assert "the first 2 (max_distractors=2" in ds.notes["distractors"]
    assert len(load_with_distractors("rparis6k", tmp_path, max_distractors=0).images) == 3
    with pytest.raises(ValueError, match="max_distractors"):
        load_with_distractors("rparis6k", tmp_path, max_distractors=-1)


def test_missing_distractors(tmp_path: Path) -> None:
    _make(tmp_path)
    for p in FILES[1:3]:
        (tmp_path / "revisitop1m" / "jpg" / p).unlink()
    with pytest.raises(
        FileNotFoundError, match=r"2 of 4 distractors are missing.*first: 1/b/4d5e6f\.jpg, 2/c/7a8b9c\.jpg"
    ):
        load_with_distractors("roxford5k", tmp_path)
    ds = load_with_distractors("roxford5k", tmp_path, allow_missing=True)
    assert ds.images[3:] == tuple(f"revisitop1m/jpg/{p}" for p in (FILES[0], FILES[3]))
    assert "2 of 4 distractors absent" in ds.notes["missing_distractors"]
    assert len(load_with_distractors("roxford5k", tmp_path, max_distractors=1).images) == 4  # only the first checked


def test_check_images_false_and_missing_list(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"revisitop1m\.txt not found"):
        load_with_distractors("roxford5k", tmp_path)
    _make(tmp_path, images=False)
    with pytest.raises(FileNotFoundError, match="4 of 4 images are missing"):  # the base images, first
        load_with_distractors("roxford5k", tmp_path)
    ds = load_with_distractors("roxford5k", tmp_path, check_images=False)
    assert len(ds.images) == 7 and "images_checked" in ds.notes
    assert all(isinstance(g["easy"], np.ndarray) for g in ds.gnd)


def test_read_distractor_list(tmp_path: Path) -> None:
    p = tmp_path / "l.txt"
    p.write_text("a/b\r\nc/d.jpg\n\n")
    assert read_distractor_list(p) == ["a/b.jpg", "c/d.jpg"]
    p.write_text("../etc/x.jpg\n")
    with pytest.raises(ValueError, match="line 1"):
        read_distractor_list(p)
