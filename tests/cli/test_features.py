"""``retrbench extract`` and ``retrbench evaluate --features`` (retrbench/cli/features.py):
extract -> evaluate gives run's metrics; revisitop's .mat files are read; bad files and bad
usage give one line naming the file (exit 1) or the option (exit 2)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from retrbench.cli import main

RUN = ["--model", "random", "--dataset", "demo", "--workers", "0"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's ground truth and its descriptors written by ``retrbench extract``."""
    import retrbench as rb

    folder = tmp_path_factory.mktemp("features")
    gnd = rb.load_dataset("demo").root.parent / "gnd_demo.pkl"
    assert main(["extract", *RUN, "--out", str(folder / "demo.npz")]) == 0
    return folder / "demo.npz", gnd


def _metrics(path) -> dict[tuple[str, str], float]:
    data = json.loads(path.read_text())
    return {(m["split"], m["metric"]): m["value"] for m in data.get("metrics") or data["rows"]}


@pytest.mark.parametrize("post", [["--whiten", "8", "--rerank", "aqe"], ["--whiten", "none", "--rerank", "dba:k=3+aqe", "--topk", "50"]])
def test_extract_then_evaluate_equals_run(demo, tmp_path, capsys, post):
    features, gnd = demo
    assert main(["run", *RUN, *post, "--results-dir", "none", "--json", str(tmp_path / "run.json")]) == 0
    assert main(["evaluate", "--features", str(features), "--gnd", str(gnd), *post, "--json", str(tmp_path / "ev.json")]) == 0
    out = capsys.readouterr().out
    assert "| demo.npz" in out and "Medium mAP" in out
    assert _metrics(tmp_path / "ev.json") == _metrics(tmp_path / "run.json")
    rows = json.loads((tmp_path / "ev.json").read_text())["rows"]
    run_rows = json.loads((tmp_path / "run.json").read_text())["rows"]
    assert rows[0]["config_id"] == run_rows[0]["config_id"] and rows[0]["features_file"] == str(features)


def test_whitening_features_from_another_file(demo, tmp_path, capsys):
    features, gnd = demo
    # whitening learned on the same descriptors given as a file = learned on the database (run's default)
    assert main(["run", *RUN, "--whiten", "8", "--results-dir", "none", "--json", str(tmp_path / "run.json")]) == 0
    args = ["evaluate", "--features", str(features), "--gnd", str(gnd), "--whiten", "8"]
    assert main([*args, "--whiten-features", str(features), "--json", str(tmp_path / "ev.json")]) == 0
    assert _metrics(tmp_path / "ev.json") == _metrics(tmp_path / "run.json")
    # another training set changes the numbers
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "other.npz", database=rng.standard_normal((300, 512)).astype(np.float32), queries=np.zeros((0, 512), np.float32))
    assert main([*args, "--whiten-features", str(tmp_path / "other.npz"), "--json", str(tmp_path / "ev2.json")]) == 0
    assert _metrics(tmp_path / "ev2.json") != _metrics(tmp_path / "run.json")


def test_evaluate_reads_revisitop_mat(demo, tmp_path, capsys):
    from scipy.io import savemat

    from retrbench.descriptors import load_descriptors

    features, gnd = demo
    desc = load_descriptors(features)
    savemat(tmp_path / "demo_gem.mat", {"X": desc.database.T.astype(np.float64), "Q": desc.queries.T.astype(np.float64)})
    assert main(["evaluate", "--features", str(tmp_path / "demo_gem.mat"), "--gnd", str(gnd), "--json", str(tmp_path / "mat.json")]) == 0
    assert main(["evaluate", "--features", str(features), "--gnd", str(gnd), "--json", str(tmp_path / "npz.json")]) == 0
    assert _metrics(tmp_path / "mat.json") == _metrics(tmp_path / "npz.json")
    assert "| demo_gem.mat" in capsys.readouterr().out
    # the same descriptors stored as rows (N x D) in a .mat: refused, and told to transpose
    savemat(tmp_path / "rows.mat", {"X": desc.database, "Q": desc.queries.T})
    assert main(["evaluate", "--features", str(tmp_path / "rows.mat"), "--gnd", str(gnd)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rows.mat: 'X' has D=197 rows but 'Q' has D=512" in err
    assert "'X' looks stored with one image a row: transpose it" in err


def test_permuted_ids_are_matched_and_other_ids_refused(demo, tmp_path, capsys):
    from retrbench.descriptors import Descriptors, load_descriptors

    features, gnd = demo
    desc = load_descriptors(features)
    perm = np.random.default_rng(1).permutation(len(desc.database_ids))
    shuffled = Descriptors(desc.database[perm], desc.queries, tuple(desc.database_ids[i] for i in perm), desc.query_ids)
    shuffled.save(tmp_path / "shuffled")  # the .npy folder layout
    assert main(["evaluate", "--features", str(tmp_path / "shuffled"), "--gnd", str(gnd), "--json", str(tmp_path / "a.json")]) == 0
    assert main(["evaluate", "--features", str(features), "--gnd", str(gnd), "--json", str(tmp_path / "b.json")]) == 0
    assert _metrics(tmp_path / "a.json") == _metrics(tmp_path / "b.json")
    capsys.readouterr()
    wrong = Descriptors(desc.database, desc.queries, tuple(f"x_{i}" for i in range(len(desc.database_ids))), desc.query_ids)
    wrong.save(tmp_path / "wrong.npz")
    assert main(["evaluate", "--features", str(tmp_path / "wrong.npz"), "--gnd", str(gnd)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wrong.npz: database_ids (197) do not name the images of gnd_demo.pkl's imlist (197)" in err


def _tiny_gnd(tmp_path):
    gnd = {"imlist": ["a", "b", "c"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [2], "junk": [1]}]}
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(gnd))
    return str(tmp_path / "gnd.pkl")


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"database": np.ones((3, 4)), "queries": np.full((1, 4), np.nan)}, "bad.npz: 'queries' holds 4 non-finite values (NaN or inf), the first in row 0; refused"),
        ({"database": np.ones((2, 4)), "queries": np.ones((1, 4))}, "bad.npz: 'database' is (2, 4): 2 descriptors, but gnd.pkl lists 3 images (imlist)"),
        ({"database": np.ones((4, 3)), "queries": np.ones((1, 3))}, "bad.npz: 'database' is (4, 3) but gnd.pkl lists 3 images (imlist): it looks transposed"),
        ({"database": np.ones((3, 4)), "queries": np.ones((2, 4))}, "bad.npz: 'queries' is (2, 4): 2 descriptors, but gnd.pkl lists 1 images (qimlist)"),
        ({"database": np.ones((3, 4)), "queries": np.ones((1, 5))}, "bad.npz: 'database' is (3, 4) but 'queries' is (1, 5)"),
        ({"db": np.ones((3, 4))}, "bad.npz: no 'database' or 'queries' array (it has 'db')"),
    ],
)
def test_bad_descriptor_files_are_one_line_naming_the_file(tmp_path, capsys, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    assert main(["evaluate", "--features", str(tmp_path / "bad.npz"), "--gnd", _tiny_gnd(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_bad_usage_is_exit_2(tmp_path, capsys):
    gnd = _tiny_gnd(tmp_path)
    np.savez(tmp_path / "f.npz", database=np.eye(3, 4), queries=np.ones((1, 4)))
    np.save(tmp_path / "ranks.npy", np.array([[0, 1, 2]]))
    f = ["evaluate", "--features", str(tmp_path / "f.npz"), "--gnd", gnd]
    assert main(f) == 0
    capsys.readouterr()
    cases = [
        ([*f, "--whiten-features", str(tmp_path / "f.npz")], "--whiten-features is the whitening's training set: give --whiten D too"),
        ([*f, "--rerank", "aqee"], "did you mean 'aqe'"),
        (["evaluate", "--ranks", str(tmp_path / "ranks.npy"), "--gnd", gnd, "--whiten", "8"], "--whiten act on descriptors: use them with --features"),
        (["extract", *RUN, "--out", str(tmp_path / "f.pt")], "--out " + str(tmp_path / "f.pt") + ": unknown descriptor file type '.pt'"),
        (["extract", "--model", "nope", "--out", str(tmp_path / "f.npz")], "unknown"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    # argparse refuses what neither command takes
    for argv in (
        ["evaluate", "--ranks", str(tmp_path / "ranks.npy"), "--features", str(tmp_path / "f.npz"), "--gnd", gnd],
        ["evaluate", "--gnd", gnd],
        ["extract", *RUN, "--whiten", "8", "--out", str(tmp_path / "g.npz")],
        ["extract", *RUN],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    capsys.readouterr()
    assert not (tmp_path / "g.npz").exists()


@pytest.mark.parametrize("suffix", [".h5", "", ".mat"])
def test_extract_writes_every_format(demo, tmp_path, capsys, suffix):
    from retrbench.descriptors import load_descriptors

    if suffix == ".h5":
        pytest.importorskip("h5py", reason="h5py is optional (pip install 'retrbench[h5]')")
    features, gnd = demo
    out = tmp_path / f"demo{suffix}"
    assert main(["extract", *RUN, "--out", str(out)]) == 0
    assert f"wrote {out} (database 197 x 512, queries 28 x 512" in capsys.readouterr().out
    got, ref = load_descriptors(out), load_descriptors(features)
    np.testing.assert_array_equal(got.database, ref.database)
    assert got.query_ids == ref.query_ids and got.config["model"] == "random"
    assert main(["evaluate", "--features", str(out), "--gnd", str(gnd), "--json", str(tmp_path / "a.json")]) == 0
    assert main(["evaluate", "--features", str(features), "--gnd", str(gnd), "--json", str(tmp_path / "b.json")]) == 0
    assert _metrics(tmp_path / "a.json") == _metrics(tmp_path / "b.json")


def test_h5_output_without_h5py_fails_before_extracting(tmp_path, capsys, monkeypatch, without_h5py):
    monkeypatch.setattr("retrbench.exchange.extract", lambda *a, **k: pytest.fail("extracted before checking --out"))
    assert main(["extract", *RUN, "--out", str(tmp_path / "f.h5")]) == 2
    assert "HDF5 files need h5py (pip install 'retrbench[h5]')" in capsys.readouterr().err


def test_kappas_apply_to_features(demo, tmp_path, capsys):
    features, gnd = demo
    assert main(["evaluate", "--features", str(features), "--gnd", str(gnd), "--kappas", "1,3", "--json", str(tmp_path / "k.json")]) == 0
    assert {m for _, m in _metrics(tmp_path / "k.json")} == {"mAP", "mP@1", "mP@3"}
