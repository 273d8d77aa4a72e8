"""Descriptor files (retrbench/descriptors.py): every format round-trips, bad files are refused
with messages naming the file and the array, ids align rows to a ground truth; and the notebook
API (rb.extract / rb.evaluate_descriptors) gives run's numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from retrbench.descriptors import Descriptors, descriptor_format, load_descriptors, save_descriptors


def _h5py():
    return pytest.importorskip("h5py", reason="h5py is optional (pip install 'retrbench[h5]')")


def _desc(rng, n=7, q=3, d=5, ids=True):
    db = rng.standard_normal((n, d)).astype(np.float32)
    qs = rng.standard_normal((q, d)).astype(np.float32)
    names = tuple(f"jpg/im_{i:03d}.jpg" for i in range(n)) if ids else None
    qnames = tuple(f"jpg/q_{i}.jpg" for i in range(q)) if ids else None
    return Descriptors(db, qs, names, qnames, {"model": "random", "dataset": "demo", "nested": {"a": [1, 2]}})


FORMATS = ["F.npz", "F.h5", "F.hdf5", "F.mat", "F"]


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_round_trips(tmp_path, rng, name):
    if descriptor_format(name) == "h5":
        _h5py()
    desc = _desc(rng)
    path = desc.save(tmp_path / name)
    back = load_descriptors(path)
    np.testing.assert_array_equal(back.database, desc.database)
    np.testing.assert_array_equal(back.queries, desc.queries)
    assert back.database.dtype == np.float32 and back.database.flags.c_contiguous
    assert back.database_ids == desc.database_ids and back.query_ids == desc.query_ids
    assert back.config == desc.config and back.source == str(path)
    # without ids, and with empty query sets
    bare = Descriptors(desc.database, desc.queries[:0])
    back = load_descriptors(save_descriptors(bare, tmp_path / ("bare_" + name)))
    assert back.database_ids is None and back.query_ids is None and back.queries.shape == (0, 5)


def test_formats_by_suffix(tmp_path):
    assert [descriptor_format(p) for p in ("a.npz", "a.NPZ", "a.h5", "a.hdf5", "a.mat", "a", "a/")] == ["npz", "npz", "h5", "h5", "mat", "npy", "npy"]
    (tmp_path / "dir.v2").mkdir()
    assert descriptor_format(tmp_path / "dir.v2") == "npy"
    with pytest.raises(ValueError, match=r"a\.pt: unknown descriptor file type '\.pt'.*\.npz"):
        descriptor_format("a.pt")


def test_mat_is_revisitop_columns(tmp_path, rng):
    from scipy.io import loadmat, savemat

    desc = _desc(rng)
    m = loadmat(desc.save(tmp_path / "f.mat"))
    assert m["X"].shape == (5, 7) and m["Q"].shape == (5, 3)  # D x N, D x Q
    np.testing.assert_array_equal(m["X"].T, desc.database)
    # a file as revisitop ships them: X and Q only, double precision
    savemat(tmp_path / "r.mat", {"X": desc.database.T.astype(np.float64), "Q": desc.queries.T.astype(np.float64)})
    back = load_descriptors(tmp_path / "r.mat")
    np.testing.assert_allclose(back.database, desc.database)
    assert back.layout == "columns" and back.database_ids is None and back.config == {}


def test_matlab_v73_file_is_read_with_h5py(tmp_path, rng):
    h5py = _h5py()
    desc = _desc(rng)
    path = tmp_path / "v73.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        f["X"] = desc.database  # MATLAB's D x N, column-major, is an N x D HDF5 dataset
        f["Q"] = desc.queries
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116) + b"\0" * 8 + b"\x00\x02" + b"IM")
    back = load_descriptors(path)
    np.testing.assert_array_equal(back.database, desc.database)
    np.testing.assert_array_equal(back.queries, desc.queries)


def test_folder_layout_files_and_ids_with_line_breaks(tmp_path, rng):
    desc = _desc(rng)
    path = desc.save(tmp_path / "feats")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "database.npy", "database_ids.txt", "queries.npy", "query_ids.txt"]
    assert (path / "database_ids.txt").read_text().splitlines()[0] == "jpg/im_000.jpg"
    odd = Descriptors(desc.database[:2], desc.queries, ("a\nb", ""), desc.query_ids)
    path = odd.save(tmp_path / "feats")  # replaces the previous folder
    assert json.loads((path / "database_ids.json").read_text()) == ["a\nb", ""]
    assert not (path / "database_ids.txt").exists() and load_descriptors(path).database_ids == ("a\nb", "")
    assert [p.name for p in tmp_path.iterdir()] == ["feats"]  # no temporary folder left
    # never replaces a folder that is not a descriptor folder
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="photos: a folder holding other files"):
        desc.save(tmp_path / "photos")
    assert (tmp_path / "photos" / "a.jpg").exists()


def test_writes_are_atomic(tmp_path, rng, monkeypatch):
    desc = _desc(rng)
    path = desc.save(tmp_path / "f.npz")
    before = path.read_bytes()

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        _desc(rng).save(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["f.npz"]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"database": np.ones((3, 4), np.float32)}, r"no 'queries' array \(it has 'database'\)"),
        ({"database": np.ones((3, 4), np.int64), "queries": np.ones((1, 4))}, r"'database' holds int64 values; descriptors must be floating point"),
        ({"database": np.ones((3,)), "queries": np.ones((1, 4))}, r"'database' has shape \(3,\); expected a 2-D \(n, D\) array"),
        ({"database": np.ones((3, 4)), "queries": np.ones((1, 5))}, r"'database' is \(3, 4\) but 'queries' is \(1, 5\)"),
        ({"database": np.array([[1.0, np.nan], [np.inf, 0], [0, 0]]), "queries": np.ones((1, 2))}, r"'database' holds 2 non-finite values \(NaN or inf\), the first in row 0"),
        ({"database": np.ones((3, 4)), "queries": np.ones((1, 4)), "database_ids": np.array(["a", "b"])}, r"2 database_ids for 3 descriptors in 'database'"),
        ({"database": np.ones((3, 4)), "queries": np.ones((1, 4)), "query_ids": np.array([["a"]])}, r"'query_ids' must be a 1-D array of strings"),
        ({"database": np.ones((3, 4)), "queries": np.ones((1, 4)), "config": np.array("{not json")}, r"the config entry is not JSON"),
    ],
)
def test_bad_npz_files_name_file_and_array(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"bad\.npz: " + message):
        load_descriptors(path)


def test_bad_files_of_other_kinds(tmp_path, rng):
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match=r"text\.npz: cannot read it as a numpy \.npz archive"):
        load_descriptors(tmp_path / "text.npz")
    np.save(tmp_path / "one.npy", np.ones((2, 2)))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(ValueError, match=r"one\.npz: holds a single array"):
        load_descriptors(tmp_path / "one.npz")
    np.savez(tmp_path / "pickled.npz", database=np.ones((2, 2)), queries=np.ones((1, 2)), database_ids=np.array(["a", 1], dtype=object))
    with pytest.raises(ValueError, match=r"pickled\.npz: 'database_ids' cannot be read without unpickling"):
        load_descriptors(tmp_path / "pickled.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz: no such descriptor file"):
        load_descriptors(tmp_path / "missing.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no 'database.npy' or 'queries.npy' file"):
        load_descriptors(tmp_path / "empty")
    from scipy.io import savemat

    savemat(tmp_path / "other.mat", {"feats": np.ones((2, 2))})
    with pytest.raises(ValueError, match=r"other\.mat: no 'X' or 'Q' variable \(it has 'feats'\); revisitop's feature files hold X"):
        load_descriptors(tmp_path / "other.mat")
    # rows where revisitop has columns: X is N x D and Q is Q x D
    savemat(tmp_path / "rows.mat", {"X": np.ones((7, 5)), "Q": np.ones((3, 5))})
    with pytest.raises(ValueError, match=r"rows\.mat: 'X' has D=7 rows but 'Q' has D=3.*look like rows.*transpose both"):
        load_descriptors(tmp_path / "rows.mat")
    savemat(tmp_path / "nan.mat", {"X": np.full((5, 7), np.nan), "Q": np.ones((5, 3))})
    with pytest.raises(ValueError, match=r"nan\.mat: 'X' holds 35 non-finite values \(NaN or inf\), the first in column 0"):
        load_descriptors(tmp_path / "nan.mat")


def test_h5_without_h5py_is_a_clear_error(tmp_path, rng, monkeypatch, without_h5py):
    with pytest.raises(RuntimeError, match=r"f\.h5: HDF5 files need h5py: pip install 'retrbench\[h5\]'"):
        _desc(rng).save(tmp_path / "f.h5")


# ----------------------------------------------------------------------------- aligning to a ground truth

IMLIST = [f"im_{i:03d}" for i in range(7)]
QIMLIST = [f"q_{i}" for i in range(3)]


def test_ids_as_written_without_extension_or_by_file_name(rng):
    desc = _desc(rng)  # ids jpg/im_000.jpg ... : same order as IMLIST by file name
    assert desc.aligned(IMLIST, QIMLIST) is desc
    assert desc.aligned([f"jpg/im_{i:03d}" for i in range(7)], [f"jpg/q_{i}" for i in range(3)]) is desc


def test_permuted_ids_are_reordered(rng):
    desc = _desc(rng)
    perm = rng.permutation(7)
    shuffled = Descriptors(desc.database[perm], desc.queries[::-1], tuple(desc.database_ids[i] for i in perm), desc.query_ids[::-1])
    out = shuffled.aligned(IMLIST, QIMLIST)
    np.testing.assert_array_equal(out.database, desc.database)
    np.testing.assert_array_equal(out.queries, desc.queries)
    assert out.database_ids == desc.database_ids


def test_ids_that_do_not_match_are_refused(rng):
    desc = _desc(rng)
    with pytest.raises(ValueError, match=r"database_ids \(7\) do not name the images of gnd\.pkl's imlist \(8\): 1 imlist names without an id \('im_007'\)"):
        desc.aligned([*IMLIST, "im_007"], QIMLIST, reference="gnd.pkl")
    other = [f"other_{i}" for i in range(7)]
    with pytest.raises(ValueError, match=r"7 ids not in imlist \('jpg/im_000.jpg', 'jpg/im_001.jpg', 'jpg/im_002.jpg' \.\.\. \(7 in all\)\); 7 imlist names"):
        desc.aligned(other, QIMLIST)
    dup = Descriptors(desc.database[:3], desc.queries, ("a", "a", "b"), desc.query_ids)
    with pytest.raises(ValueError, match=r"ids repeat \('a'\) so they cannot be matched one to one"):
        dup.aligned(["a", "b", "b"], QIMLIST)


def test_row_counts_and_orientation_without_ids(rng):
    desc = _desc(rng, ids=False)
    assert desc.aligned(IMLIST, QIMLIST) is desc
    with pytest.raises(ValueError, match=r"'database' is \(7, 5\): 7 descriptors, but the ground truth lists 8 images \(imlist\)"):
        desc.aligned([*IMLIST, "x"], QIMLIST)
    transposed = Descriptors(np.ones((5, 7), np.float32), np.ones((3, 7), np.float32))
    with pytest.raises(ValueError, match=r"'database' is \(5, 7\) but the ground truth lists 7 images \(imlist\): it looks transposed"):
        transposed.aligned(IMLIST, QIMLIST)
    # a .mat whose X holds one row per image (N x D) instead of revisitop's columns
    stored_rows = Descriptors(np.ones((5, 7), np.float32), np.ones((3, 7), np.float32), source="f.mat", layout="columns")
    with pytest.raises(ValueError, match=r"f\.mat: 'X' is 7 x 5 \(D x n as stored\) but the ground truth lists 7 images.*one column per image \(D x n\): transpose it"):
        stored_rows.aligned(IMLIST, QIMLIST[:3])


# ----------------------------------------------------------------------------- notebook API


@pytest.fixture(scope="module")
def demo():
    import retrbench as rb

    ds = rb.load_dataset("demo")
    return rb.extract(model="random", dataset="demo", workers=0), ds, ds.root.parent / "gnd_demo.pkl"


def test_extract_writes_what_run_post_processes(demo, tmp_path):
    import retrbench as rb

    desc, ds, gnd = demo
    assert isinstance(desc, rb.Descriptors) and desc.database.shape == (len(ds.images), 512)
    assert desc.database_ids == ds.images and desc.query_ids == tuple(q.image for q in ds.queries)
    cfg = desc.config
    assert cfg["model"] == "random" and cfg["pooling"] == "gem" and cfg["weights_sha256"] == "random-descriptors"
    assert cfg["format"] == "retrbench-descriptors/1" and "not whitened" in cfg["descriptor"] and cfg["retrbench_version"] == rb.__version__
    assert cfg["image_size_used"] and not {"whiten", "rerank", "topk", "whiten_source"} & set(cfg)
    assert not np.allclose(np.linalg.norm(desc.database, axis=1), 1.0)  # un-normalised
    ref = rb.run(model="random", dataset="demo", workers=0, whiten=8, rerank="aqe", results_dir=None)
    for source in (desc, desc.save(tmp_path / "demo.npz")):
        got = rb.evaluate_descriptors(source, ds, whiten=8, rerank="aqe")
        assert got.metrics[["split", "metric", "value"]].equals(ref.metrics[["split", "metric", "value"]])
        assert got.rows[0]["config_id"] == ref.rows[0]["config_id"] and got.rows[0]["model_label"] == "Random"
    via_pickle = rb.evaluate_descriptors(tmp_path / "demo.npz", gnd, "revisited", whiten=8, rerank="aqe")
    assert via_pickle.metrics.value.tolist() == ref.metrics.value.tolist()
    with pytest.raises(ValueError, match="rerank, whiten act on descriptors after extraction"):
        rb.extract(model="random", dataset="demo", whiten=8, rerank="aqe")


def test_ensemble_is_the_concatenation_of_normalised_parts(demo):
    import retrbench as rb
    from retrbench.utils.linalg import l2_normalize

    desc = demo[0]
    both = rb.extract(model="random+random", dataset="demo", workers=0)
    np.testing.assert_allclose(both.database, np.hstack([l2_normalize(desc.database)] * 2), rtol=1e-6)


def test_whitening_learned_on_other_descriptors(demo, rng):
    import retrbench as rb

    desc, ds, _ = demo
    own = rb.evaluate_descriptors(desc, ds, whiten=8)
    same = rb.evaluate_descriptors(desc, ds, whiten=8, whiten_features=desc)
    assert same.metrics.value.tolist() == own.metrics.value.tolist()
    other = rb.evaluate_descriptors(desc, ds, whiten=8, whiten_features=rng.standard_normal((300, 512)))
    assert other.metrics.value.tolist() != own.metrics.value.tolist()
    with pytest.raises(ValueError, match="whiten_features: whitening descriptors have D=4 but random on demo has D=512"):
        rb.evaluate_descriptors(desc, ds, whiten=8, whiten_features=np.ones((9, 4)))
    with pytest.raises(ValueError, match="give a whitening dimension"):
        rb.evaluate_descriptors(desc, ds, whiten_features=desc)


def test_foreign_descriptors_get_rows_named_after_the_file(demo, tmp_path):
    from scipy.io import savemat

    import retrbench as rb

    desc, ds, gnd = demo
    savemat(tmp_path / "demo_resnet_gem.mat", {"X": desc.database.T, "Q": desc.queries.T})
    res = rb.evaluate_descriptors(tmp_path / "demo_resnet_gem.mat", gnd)
    row = res.rows[0]
    assert row["model"] == "demo_resnet_gem" and row["dataset"] == "demo" and row["pooling"] is None
    assert res.metrics.value.tolist() == rb.evaluate_descriptors(desc, ds).metrics.value.tolist()
    assert res.per_query.shape[0] == 3 * len(ds.queries)
