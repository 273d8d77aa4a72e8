"""Every DATASETS entry (found automatically), the folder: resolver and the builder API.

A new dataset module gets these checks without a line here: metadata filled, protocol known to
the evaluation stage, and a missing data root answered by an error naming the expected path.
Entries with a tiny layout builder below are also loaded and evaluated end to end.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrbench.datasets import (
    DATASETS,
    DEFAULT_IMAGE_SIZE,
    DatasetInfo,
    dataset_label,
    default_image_size,
    default_resize,
    load_dataset,
)
from retrbench.evaluation import PROTOCOLS, evaluate
from retrbench.registry import EntryInfo
from retrbench.types import RetrievalDataset

ENTRIES = [e.name for e in DATASETS]
SELF_BUILDING = {"demo"}  # built at first use under the data root: never "missing"


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (90, 140, 200)).save(buf, format="JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def _files(folder: Path, rel_paths: list[str], data: bytes = JPEG) -> None:
    for rel in rel_paths:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


# ----------------------------------------------------------------------------- tiny layouts


def _revisited(root: Path, name: str) -> None:
    gnd = {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q"],
        "gnd": [{"bbx": [1.0, 1.0, 9.0, 9.0], "easy": [0], "hard": [1], "junk": [2]}],
    }
    (root / name).mkdir(parents=True)
    (root / name / f"gnd_{name}.pkl").write_bytes(pickle.dumps(gnd))
    _files(root / name / "jpg", ["a.jpg", "b.jpg", "c.jpg", "q.jpg"])


def _classic(root: Path, name: str) -> None:
    gnd = {
        "imlist": ["a", "b", "c"],
        "qimlist": ["a"],
        "gnd": [{"bbx": [1.0, 1.0, 9.0, 9.0], "ok": [0, 1], "junk": [2]}],
    }
    (root / name).mkdir(parents=True)
    (root / name / f"gnd_{name}.pkl").write_bytes(pickle.dumps(gnd))
    _files(root / name / "jpg", ["a.jpg", "b.jpg", "c.jpg"])


def _with_distractors(root: Path, base: str) -> None:
    _revisited(root, base)
    (root / "revisitop1m").mkdir()
    (root / "revisitop1m" / "revisitop1m.txt").write_text("0/d1.jpg\n0/d2\n")
    _files(root / "revisitop1m" / "jpg", ["0/d1.jpg", "0/d2.jpg"])


def _ukbench(root: Path) -> None:
    _files(root / "ukbench", [f"ukbench{i:05d}.jpg" for i in range(8)])


def _coil20(root: Path) -> None:
    buf = io.BytesIO()
    Image.new("L", (4, 4), 100).save(buf, format="PNG")
    _files(root / "coil20", [f"obj{o}__{v}.png" for o in (1, 2) for v in range(72)], buf.getvalue())


def _instre(root: Path) -> None:
    sio = pytest.importorskip("scipy.io")
    imlist, qimlist = ["S1/a/1.jpg", "S1/a/2.jpg", "S2/b/1.jpg"], ["S1/a/9.jpg"]
    cell = np.empty((1, len(imlist)), dtype=object)
    cell[0, :] = imlist
    qcell = np.empty((1, 1), dtype=object)
    qcell[0, 0] = qimlist[0]
    gnd = np.empty((1, 1), dtype=[("ok", "O"), ("bbx", "O")])
    gnd[0, 0]["ok"] = np.array([[1.0, 2.0]])  # 1-based, as MATLAB
    gnd[0, 0]["bbx"] = np.array([[1.0, 1.0, 9.0, 9.0]])
    (root / "instre").mkdir(parents=True)
    sio.savemat(str(root / "instre" / "gnd_instre.mat"), {"imlist": cell, "qimlist": qcell, "gnd": gnd})
    _files(root / "instre", imlist + qimlist)


def _gldv2(root: Path) -> None:
    index, test = ["aaa111", "bbb222", "ccc333"], ["ddd444"]
    d = root / "gldv2"
    d.mkdir(parents=True)
    (d / "index.csv").write_text("id\n" + "\n".join(index) + "\n")
    (d / "retrieval_solution_v2.1.csv").write_text(f"id,images,Usage\n{test[0]},{index[0]} {index[2]},Public\n")
    _files(
        d, [f"index/{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i in index] + [f"test/{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i in test]
    )


def _demo(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A demo folder from a stand-in generation (the real one takes seconds; see tests/datasets/demo)."""
    from retrbench.datasets.demo import build

    gnd = {
        "imlist": ["demo_000", "demo_001"],
        "qimlist": ["query_x_1"],
        "gnd": [{"easy": [0], "hard": [], "junk": [1], "bbx": [1.0, 1.0, 9.0, 9.0]}],
    }
    files = {"jpg/demo_000.jpg": JPEG, "jpg/demo_001.jpg": JPEG, "jpg/query_x_1.jpg": JPEG}
    files |= {build.GND_FILE: pickle.dumps(gnd, protocol=4), "views.json": b"[]\n"}
    monkeypatch.setattr(build, "generate", lambda: (files, []))
    build.build_demo(root)


TINY: dict[str, Callable[[Path, pytest.MonkeyPatch], None]] = {
    "roxford5k": lambda r, m: _revisited(r, "roxford5k"),
    "rparis6k": lambda r, m: _revisited(r, "rparis6k"),
    "oxford5k": lambda r, m: _classic(r, "oxford5k"),
    "paris6k": lambda r, m: _classic(r, "paris6k"),
    "roxford5k+1m": lambda r, m: _with_distractors(r, "roxford5k"),
    "rparis6k+1m": lambda r, m: _with_distractors(r, "rparis6k"),
    "ukbench": lambda r, m: _ukbench(r),
    "coil20": lambda r, m: _coil20(r),
    "instre": lambda r, m: _instre(r),
    "gldv2": lambda r, m: _gldv2(r),
    "demo": _demo,
}


def _check_dataset(ds: RetrievalDataset, protocol: str) -> None:
    """Files exist, the ground truth indexes the database with the protocol's keys, evaluation accepts it."""
    assert ds.protocol == protocol and len(ds.images) > 0 and len(ds.queries) == len(ds.gnd) > 0
    assert len(set(ds.images)) == len(ds.images)
    for rel in (*ds.images, *(q.image for q in ds.queries)):
        assert (ds.root / rel).is_file(), rel
    info = PROTOCOLS.get(protocol).info
    for g in ds.gnd:
        assert set(info.keys) <= set(g)
        for k in info.keys:
            arr = np.asarray(g[k])
            assert arr.dtype == np.int64 and arr.ndim == 1
            assert ((arr >= 0) & (arr < len(ds.images))).all()
    ranks = np.tile(np.arange(len(ds.images), dtype=np.int64), (len(ds.queries), 1))  # (Q, N)
    metrics = evaluate(ranks, ds.gnd, protocol)
    assert metrics and {m.split for m in metrics} <= set(info.splits)


# ----------------------------------------------------------------------------- every entry


@pytest.mark.parametrize("name", ENTRIES)
def test_entry_metadata(name: str) -> None:
    entry = DATASETS.get(name)
    info = entry.info
    assert isinstance(info, DatasetInfo) and isinstance(info, EntryInfo)
    assert info.label.strip() and info.help.strip() and info.layout.strip()
    assert entry.label == info.label == DATASETS.label(name) == dataset_label(name)
    assert info.protocol in PROTOCOLS, f"{name}: protocol {info.protocol!r} unknown to retrbench.evaluation"
    assert info.image_size is None or info.image_size > 0
    assert default_image_size(name) == (info.image_size or DEFAULT_IMAGE_SIZE)  # never the model's
    assert default_resize(name) == info.resize in ("longer", "cirtorch")
    for alias in entry.aliases:
        assert DATASETS.get(alias) is entry


def test_labels_are_unique_and_order_follows_info() -> None:
    labels = [e.label for e in DATASETS]
    assert len(set(labels)) == len(labels), labels
    orders = [e.info.order for e in DATASETS]
    assert orders == sorted(orders)


@pytest.mark.parametrize("name", [n for n in ENTRIES if n not in SELF_BUILDING])
def test_missing_data_root_names_the_expected_path(name: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-data-here"
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        DATASETS.create(name, data_root=missing)
    assert str(missing) in str(err.value), f"{name}: the error does not name where the data was expected: {err.value}"


@pytest.mark.parametrize("name", sorted(TINY))
def test_entry_loads_a_tiny_layout(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert name in DATASETS, f"stale tiny layout: {name!r} is no longer registered"
    TINY[name](tmp_path, monkeypatch)
    ds = DATASETS.create(name, data_root=tmp_path)
    _check_dataset(ds, DATASETS.get(name).info.protocol)
    again = load_dataset(name, tmp_path)  # the CLI's path gives the same dataset
    assert again.images == ds.images and again.queries == ds.queries


# ----------------------------------------------------------------------------- folder: resolver


def test_folder_resolver(tmp_path: Path) -> None:
    _files(tmp_path, ["db/a.jpg", "db/b.jpg", "db/c.jpg", "q/x.jpg"])
    (tmp_path / "groundtruth.csv").write_text("query,positive,junk,box\nq/x.jpg,db/a.jpg,db/c.jpg,1 1 9 9\n")
    name = "folder:" + str(tmp_path)
    assert name not in DATASETS and DATASETS.is_known(name)
    assert "folder:" in DATASETS.help_text()
    ds = DATASETS.create(name)
    _check_dataset(ds, "map")
    assert ds.images == ("db/a.jpg", "db/b.jpg", "db/c.jpg") and ds.gnd[0]["ok"].tolist() == [0]
    assert default_image_size(name) == DEFAULT_IMAGE_SIZE and default_resize(name) == "longer"
    assert dataset_label(name) == tmp_path.name


# ----------------------------------------------------------------------------- load_dataset


def test_load_dataset_options_and_errors(tmp_path: Path) -> None:
    _ukbench(tmp_path)
    (tmp_path / "ukbench" / "ukbench00007.jpg").unlink()  # an incomplete group
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_dataset("ukbench", tmp_path)
    assert len(load_dataset("ukbench", tmp_path, allow_missing=True).images) == 4
    with pytest.raises(
        ValueError, match=r"dataset 'ukbench' does not take the option\(s\) \['data_root', 'max_distractors'\]"
    ):
        load_dataset("UKBench", tmp_path, max_distractors=3)
    with pytest.raises(KeyError, match="did you mean 'ukbench'"):
        load_dataset("ukbenc", tmp_path)
