"""Experiment files, the whitening memo and resumable sweeps (tiny folder dataset, random backbone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrbench.pipeline as pipeline
from retrbench.config import RunConfig
from retrbench.experiments import Experiment, config_id, load_experiment, plan, sweep
from retrbench.results import load_results
from retrbench.whitening import WhiteningMemo, postprocess

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 database images in 3 groups and one query per group (distinct noise images)."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    lines = ["query,positive"]
    for g in "abc":
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"{g}{i}.png")
            lines.append(f"q{g}.png,{g}{i}.png")
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / f"q{g}.png")
    (root / "groundtruth.csv").write_text("\n".join(lines) + "\n")
    return root


def tiny_experiment(folder: Path) -> dict:
    return {
        "name": "tiny",
        "models": ["random"],
        "datasets": [f"folder:{folder}"],
        "poolings": ["gem"],
        "whiten": [None, 4, 64],  # 12 training vectors: 64 is capped to 11
        "rerank": ["none", "aqe"],
        "fixed": {"image_size": 32, "workers": 0, "device": "cpu"},
    }


# --------------------------------------------------------------------------- experiment files


def test_cells_are_the_grid_in_order_with_model_overrides():
    exp = Experiment.from_dict(
        {
            "models": ["m1", {"model": "m2+m3", "pooling": "gem", "whiten": ["none", 32]}],
            "datasets": "demo",
            "poolings": ["rmac", "mac"],
            "whiten": [512, 512, 256],  # duplicates are dropped
            "rerank": ["none", "dba+aqe"],
            "fixed": {"image_size": 64},
        }
    )
    cells = exp.cells()
    assert len(cells) == 2 * 2 * 2 + 2 * 2
    assert cells[0] == RunConfig(model="m1", dataset="demo", pooling="rmac", whiten=512, rerank="none", image_size=64)
    assert [str(c.rerank) for c in cells[:2]] == ["none", "dba+aqe"]
    m2 = [c for c in cells if c.model == "m2+m3"]
    assert {str(c.pooling) for c in m2} == {"gem"} and [c.whiten for c in m2] == [None, None, 32, 32]
    assert exp.default_results_dir() == Path("results") / "experiment"


@pytest.mark.parametrize(
    "change, match",
    [
        ({"modles": ["x"]}, "did you mean 'models'"),
        ({"fixed": {"bn_recalib": 10}}, "not RunConfig fields"),
        ({"fixed": {"pooling": "gem"}}, "grid axes"),
        ({"whiten": ["big"]}, "whiten"),
        ({"models": [{"model": "x", "polling": "gem"}]}, "did you mean 'pooling'"),
        ({"fixed": {"image_size": 4}}, "image_size"),
    ],
)
def test_bad_experiment_files_fail_early(change, match):
    d = {"models": ["random"], "datasets": ["demo"], **change}
    with pytest.raises(ValueError, match=match):
        Experiment.from_dict(d)


def test_fixed_keys_follow_runconfig():
    """A fixed setting is accepted exactly when RunConfig has the field."""
    fields = set(RunConfig.__dataclass_fields__)
    d = {"models": ["random"], "datasets": ["demo"], "fixed": {"bn_recalibrate": 1000}}
    if "bn_recalibrate" in fields:
        assert Experiment.from_dict(d).cells()[0].bn_recalibrate == 1000
    else:
        with pytest.raises(ValueError, match="bn_recalibrate"):
            Experiment.from_dict(d)


def test_shipped_experiment_files():
    t1 = load_experiment(ROOT / "benchmarks" / "table1.yaml")
    assert [d for d in t1.datasets] == ["oxford5k", "paris6k", "instre"]
    # Table 1's DFS is Yang et al.'s offline diffusion, labelled "DFS" in the tables
    assert [s.names for s in t1.rerank] == [(), ("aqe",), ("dfs-offline",), ("dba",), ("aqe", "dfs-offline"), ("dba", "aqe"), ("dba", "dfs-offline"), ("dba", "aqe", "dfs-offline")]
    assert t1.labels == (("rerank", (("DFS (offline)", "DFS"),)),)
    assert len(t1.models) == 13 and len(t1.cells()) == 13 * 3 * 8
    gem_ap = [c for c in t1.cells() if c.model == "gem_ap_r101"]
    assert {(str(c.pooling), c.whiten) for c in gem_ap} == {("native", "shipped")}  # its own head and PCA
    # the paper's settings (preset icmr21): fixed resolution, R-MAC, 512-d, BatchNorm by train() passes
    others = [c for c in t1.cells() if c.model != "gem_ap_r101"]
    assert {(c.resize, str(c.pooling), c.whiten, c.bn_momentum) for c in others} == {("fixed:224x224", "rmac", 512, 0.1)}
    assert {c.bn_recalibrate for c in t1.cells()} == {1_000_000_000}  # every database image
    assert {c.feature_map_size for c in t1.cells() if "amdim" in c.model} == {"7x7"}
    from retrbench.experiments import _validate

    for exp in (t1,):
        _validate(exp.cells())  # every model, dataset, pooling and rerank of the paper is registered
    t2 = load_experiment(ROOT / "benchmarks" / "table2.yaml")
    assert t2.datasets == ("roxford5k", "rparis6k") and len(t2.cells()) == 26
    t3 = load_experiment(ROOT / "benchmarks" / "table3.yaml")
    assert t3.whiten == (32, 64, 128, 256, 512, 1024, 2048, None) and len(t3.cells()) == 7 * 3 * 8
    for exp in (t2, t3, load_experiment(ROOT / "benchmarks" / "demo.yaml")):
        _validate(exp.cells())


# ------------------------------------------------------------------------------ whitening memo


def test_whitening_memo_equals_postprocess_and_fits_once(rng):
    db = (rng.standard_normal((40, 6)) @ rng.standard_normal((6, 50))).astype(np.float32)  # rank 6
    q = rng.standard_normal((5, 50)).astype(np.float32)
    train = rng.standard_normal((30, 50)).astype(np.float32)  # n - 1 = 29 < 50
    memo = WhiteningMemo(max_results=20)
    for tr in (None, train):
        for dim in (None, 3, 6, 8, 29, 64):
            want = postprocess(db, q, dim, tr)
            got = memo(db.copy(), q.copy(), dim, None if tr is None else tr.copy())
            np.testing.assert_allclose(got[0], want[0], atol=1e-6)
            np.testing.assert_allclose(got[1], want[1], atol=1e-6)
            assert got[2] == want[2]
    assert memo.fits == 2  # one PCA per training set, whatever the dimensions
    again = memo(db, q, 8)
    assert again[0] is memo(db, q, 8)[0] and not again[0].flags.writeable
    assert "capped to 6" in again[2]["note"] and memo.hits >= 2


# ------------------------------------------------------------------------------------- sweeps


def test_interrupted_sweep_resumes_and_rerun_does_nothing(tiny_folder, tmp_path, monkeypatch):
    real_run = pipeline.run
    calls: list[RunConfig] = []
    infos: list[dict] = []

    def counting(cfg, **kw):
        calls.append(cfg)
        if fail_on and len(calls) == fail_on:
            raise RuntimeError("boom")
        res = real_run(cfg, **kw)
        infos.append(res.info)
        return res

    monkeypatch.setattr(pipeline, "run", counting)
    exp = tiny_experiment(tiny_folder)
    cells = Experiment.from_dict(exp).cells()
    assert len(cells) == 6

    fail_on = 3
    with pytest.raises(RuntimeError, match="boom") as err:
        sweep(exp, results_dir=tmp_path)
    assert any("run the sweep again" in n for n in getattr(err.value, "__notes__", ["run the sweep again"]))
    saved = load_results(tmp_path)
    assert set(saved.config_id) == {config_id(c) for c in cells[:2]}
    assert plan(exp, results_dir=tmp_path)["done"].tolist() == [True, True, False, False, False, False]

    fail_on = 0
    df = sweep(exp, results_dir=tmp_path)
    assert calls[3:] == cells[2:]  # resumed at the failed cell, finished cells not recomputed
    assert df.attrs["sweep"]["ran"] == 4 and df.attrs["sweep"]["skipped"] == 2
    assert list(dict.fromkeys(df.config_id)) == [config_id(c) for c in cells]
    assert len(load_results(tmp_path)) == len(df)  # nothing written twice
    # features were extracted by the first cell only; every later cell read the cache
    assert infos[0]["cache_hits"] < 2 and all(i["cache_hits"] == 2 for i in infos[1:])
    capped = df[df.whiten == 64].whitening.iloc[0]
    assert capped["capped"] and capped["dim"] == 11
    assert any("capped to 11" in n for n in df.attrs["sweep"]["notes"])

    n = len(calls)
    again = sweep(exp, results_dir=tmp_path)
    assert len(calls) == n and again.attrs["sweep"]["ran"] == 0 and again.attrs["sweep"]["skipped"] == 6
    assert again.drop(columns="date").equals(df.drop(columns="date"))


def test_sweep_survives_a_row_cut_short(tiny_folder, tmp_path):
    exp = tiny_experiment(tiny_folder) | {"whiten": [None], "rerank": ["none"]}
    sweep(exp, results_dir=tmp_path)
    path = tmp_path / "results.jsonl"
    path.write_text(path.read_text() + '{"config_id": "cut sh')  # a write killed half-way
    exp["rerank"] = ["none", "aqe"]
    df = sweep(exp, results_dir=tmp_path)
    assert df.attrs["sweep"]["ran"] == 1 and df.config_id.nunique() == 2
    assert len(load_results(tmp_path, skip_invalid=True)) == len(df)


def test_sweep_hands_the_whitening_memo_to_run_when_it_takes_one(tiny_folder, tmp_path, monkeypatch):
    real_run = pipeline.run
    seen = []

    def run_with_hook(cfg, *, results_dir=None, progress=False, backbones=None, postprocess_fn=None):
        seen.append(postprocess_fn)
        return real_run(cfg, results_dir=results_dir, progress=progress, backbones=backbones, postprocess_fn=postprocess_fn)

    monkeypatch.setattr(pipeline, "run", run_with_hook)
    exp = tiny_experiment(tiny_folder) | {"whiten": [4], "rerank": ["none", "aqe"]}
    df = sweep(exp, results_dir=tmp_path)
    assert len(seen) == 2 and isinstance(seen[0], WhiteningMemo) and seen[0] is seen[1]
    # one PCA fitted for both rerank cells; the second cell's whitened arrays come from memory
    assert (seen[0].fits, seen[0].hits) == (1, 1) and df.config_id.nunique() == 2


def test_sweep_cli(tiny_folder, tmp_path, capsys):
    import yaml

    from retrbench.cli import main

    exp = tiny_experiment(tiny_folder) | {"whiten": [None, 4], "rerank": ["none"], "results_dir": str(tmp_path / "res")}
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(exp))
    assert main(["sweep", str(f), "--dry-run"]) == 0
    assert "2 cells, 0 done" in capsys.readouterr().err
    assert main(["sweep", str(f), "--layout", "table3"]) == 0
    out, err = capsys.readouterr()
    assert "| Random" in out and "True dim" in out and "2 run" in err
    assert main(["sweep", str(f)]) == 0
    assert "2 already done, 0 run" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.yaml")]) == 2


def test_relabel_replaces_whole_label_parts():
    from retrbench.experiments import relabel

    rows = [{"rerank_label": "G+DBA+DFS (offline)", "model_label": "X"}, {"rerank_label": "G"}]
    out = relabel(rows, (("rerank", (("DFS (offline)", "DFS"),)),))
    assert [r["rerank_label"] for r in out] == ["G+DBA+DFS", "G"] and rows[0]["rerank_label"] == "G+DBA+DFS (offline)"
    with pytest.raises(ValueError, match="unknown key"):
        Experiment.from_dict({"models": ["m"], "datasets": ["demo"], "labels": {"colour": {}}})
    with pytest.raises(ValueError, match="unknown preset 'icmr2'; did you mean 'icmr21'"):
        Experiment.from_dict({"models": ["m"], "datasets": ["demo"], "preset": "icmr2"})
