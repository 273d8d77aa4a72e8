"""End to end on the built-in demo dataset, through the public API."""

import numpy as np
import pytest
import torch

import retrbench as rb
from retrbench.results import load_results


@pytest.fixture(scope="module")
def lite0_gem():
    return rb.run(model="efficientnet_lite0", dataset="demo", pooling="gem", whiten=None, workers=0)


def test_random_descriptors_are_near_chance():
    res = rb.run(model="random", dataset="demo", pooling="gem", whiten=None, workers=0)
    assert res.value("mAP", "medium") < 25


def test_pretrained_model_clearly_beats_chance(lite0_gem):
    chance = rb.run(model="random", dataset="demo", pooling="gem", whiten=None, workers=0)
    for split in ("easy", "medium", "hard"):
        assert lite0_gem.value("mAP", split) > chance.value("mAP", split) + 20
    # the hard positives are harder than the easy ones
    assert lite0_gem.value("mAP", "hard") < lite0_gem.value("mAP", "easy")


def test_second_run_reuses_cached_features_and_records_results(lite0_gem, tmp_path):
    res = rb.run(model="efficientnet_lite0", dataset="demo", pooling="gem", whiten=32, workers=0, results_dir=tmp_path)
    assert res.info["cache_hits"] == 2
    assert res.rows[0]["dim"] == 32 and res.rows[0]["whiten"] == 32
    df = load_results(tmp_path)
    assert set(df.split) == {"easy", "medium", "hard"} and (df.weights_sha256 == res.rows[0]["weights_sha256"]).all()
    assert df.n_queries.iloc[0] == len(rb.load_dataset("demo").queries)
    table = res.table()
    assert table.shape == (1, 12)
    assert "Medium mAP" in res.to_markdown()


def test_rerank_runs_from_the_cache(lite0_gem):
    res = rb.run(model="efficientnet_lite0", dataset="demo", pooling="gem", whiten=None, rerank="dba+aqe", workers=0)
    assert res.info["cache_hits"] == 2
    assert res.rows[0]["rerank"] == "dba+aqe"
    # reranking changes the ranking: the metrics are not those of global search
    assert not np.allclose(res.metrics.value.to_numpy(), lite0_gem.metrics.value.to_numpy())


@pytest.fixture
def tiny_folder(tmp_path):
    """A folder dataset: 3 objects x 2 photos, each first photo queries its pair."""
    from PIL import Image

    rng = np.random.default_rng(0)
    lines = ["query,positive"]
    for o in range(3):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        for v in range(2):
            img = np.clip(base.astype(int) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / f"o{o}_v{v}.png")
        lines.append(f"o{o}_v0.png,o{o}_v1.png")
    (tmp_path / "groundtruth.csv").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_ensemble_concatenates_and_whitens(tiny_folder):
    single = rb.run(model="random", dataset=f"folder:{tiny_folder}", whiten=None, workers=0)
    both = rb.run(model="random+random", dataset=f"folder:{tiny_folder}", whiten=None, workers=0)
    assert single.rows[0]["dim"] == 512 and both.rows[0]["dim"] == 1024
    assert both.rows[0]["weights_sha256"] == "random-descriptors+random-descriptors"
    with pytest.raises(ValueError, match="2 models but weights 'a.pth' gives 1 files"):
        rb.run(model="random+random", weights="a.pth", dataset=f"folder:{tiny_folder}", workers=0)


def test_bn_recalibration_uses_a_copy_and_its_own_cache(tiny_folder):
    from retrbench.backbones import BACKBONES
    from retrbench.pipeline import dataset_features

    ds = rb.load_dataset(f"folder:{tiny_folder}")
    backbone = BACKBONES.create("efficientnet_lite0")
    before = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    kw = dict(pooling="gem", image_size=64, workers=0, device="cpu")
    plain, _, _ = dataset_features(ds, backbone, **kw)
    recal, _, info = dataset_features(ds, backbone, bn_recalibrate=4, **kw)
    assert info["cache_hits"] == 0 and info["bn_recalibrate_s"] > 0  # not served from the plain cache
    assert not np.allclose(plain, recal)
    for k, v in backbone.state_dict().items():  # the caller's model keeps its statistics
        if k in before:
            assert torch.equal(v, before[k]), k
    again, _, info = dataset_features(ds, backbone, bn_recalibrate=4, **kw)
    assert info["cache_hits"] == 2 and info["bn_recalibrate_s"] == 0
    np.testing.assert_array_equal(again, recal)


def test_native_pooling_needs_a_model_with_a_head(tiny_folder):
    with pytest.raises(ValueError, match="no native global descriptor"):
        rb.run(model="random", dataset=f"folder:{tiny_folder}", pooling="native", workers=0)


def test_run_records_labels_ids_per_query_ap_and_defaults_to_results_dir(tiny_folder):
    from pathlib import Path

    res = rb.run(model="random", dataset=f"folder:{tiny_folder}", pooling="gem:p=4", rerank="aqe", workers=0)
    # like the CLI, rb.run appends to ./results/results.jsonl unless told otherwise
    assert Path(res.info["results_file"]).resolve() == (Path.cwd() / "results" / "results.jsonl").resolve()
    row = res.rows[0]
    assert (row["model_label"], row["pooling_label"], row["rerank_label"]) == ("Random", "GeM(p=4)", "G+AQE")
    assert row["pooling"] == "gem:p=4" and row["rerank"] == "aqe" and row["dataset_label"] == tiny_folder.name
    assert res.query_ids == ("o0_v0.png", "o1_v0.png", "o2_v0.png") and res.database_ids == ("o0_v1.png", "o1_v1.png", "o2_v1.png")
    pq = res.per_query
    assert list(pq.image) == list(res.query_ids)
    assert pq.AP.mean() == pytest.approx(res.value("mAP"))


def test_whitening_cap_is_a_warning_and_bad_names_fail_before_work(tiny_folder):
    with pytest.warns(rb.pipeline.WhiteningNote, match="capped to 2"):
        res = rb.run(model="random", dataset=f"folder:{tiny_folder}", whiten=64, workers=0, results_dir=None)
    assert res.info["whitening"]["capped"]
    with pytest.raises(KeyError, match="did you mean 'aqe'"):
        rb.run(model="random", dataset=f"folder:{tiny_folder}", rerank="aqee", results_dir=None)
    with pytest.raises(ValueError, match="unknown parameter"):
        rb.run(model="random", dataset=f"folder:{tiny_folder}", pooling="gem:z=1", results_dir=None)


def test_results_dir_that_is_a_file_fails_before_any_work(tiny_folder, tmp_path, monkeypatch):
    import retrbench.pipeline as pipeline

    def no_extraction(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("extraction ran before the results folder was checked")

    monkeypatch.setattr(pipeline, "dataset_features", no_extraction)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        rb.run(model="random", dataset=f"folder:{tiny_folder}", results_dir=tmp_path / "file")


def test_evaluation_is_exact_on_the_full_ranking_and_approximate_indexes_are_labelled():
    from retrbench.evaluation import evaluate
    from retrbench.pipeline import evaluate_features

    rng = np.random.default_rng(0)
    db = rng.standard_normal((3000, 16)).astype(np.float32)
    q = rng.standard_normal((6, 16)).astype(np.float32)
    gnd = [{"ok": rng.choice(3000, 20, replace=False), "junk": np.array([], np.int64)} for _ in q]
    exact = evaluate_features(db, q, gnd, "map", rerank="aqe")
    assert exact.provenance["evaluation"] == "exact" and exact.provenance["ranking_length"] == 3000
    assert not exact.provenance["approximate"] and exact.provenance["index"] == "flat"
    full = evaluate(exact.result.indices, gnd, "map")  # the ranked list here is the full ranking
    assert {(m.split, m.name): round(m.value, 9) for m in exact.metrics} == {(m.split, m.name): round(m.value, 9) for m in full}
    ivf = evaluate_features(db, q, gnd, "map", index="IVF16,Flat", nprobe=1)
    p = ivf.provenance
    assert p["approximate"] and p["evaluation"] == "top-k" and p["index"] == "IVF16,Flat"
    assert 0.0 <= p["index_info"]["recall"][next(iter(p["index_info"]["recall"]))] <= 1.0


def test_shipped_whitening_is_the_checkpoints_own():
    from types import SimpleNamespace

    from retrbench.pipeline.features import DatasetFeatures
    from retrbench.pipeline.run import _shipped_whitening

    rng = np.random.default_rng(0)
    db, q = rng.standard_normal((7, 4)).astype(np.float32), rng.standard_normal((2, 4)).astype(np.float32)
    proj = rng.standard_normal((4, 3))
    seen = []

    def whiten_shipped(x, name=None):  # a checkpoint's PCA: (N, 4) -> (N, 3)
        seen.append(name)
        return x @ proj

    backbone = SimpleNamespace(name="gem_ap_r101", whiten_shipped=whiten_shipped)
    feats = DatasetFeatures(db, q, None, None, [backbone], [1024], {})
    wdb, wq, note = _shipped_whitening(feats, "shipped:Landmarks_clean")
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(wdb, unit(db) @ proj, rtol=1e-5)  # applied to the L2-normalised descriptors
    np.testing.assert_allclose(wq, unit(q) @ proj, rtol=1e-5)
    assert seen == ["Landmarks_clean"] * 2 and "Landmarks_clean" in note
    with pytest.raises(ValueError, match="not for ensembles"):
        _shipped_whitening(DatasetFeatures(db, q, None, None, [backbone, backbone], [1, 1], {}), "shipped")
    with pytest.raises(ValueError, match="ships no whitening"):
        _shipped_whitening(DatasetFeatures(db, q, None, None, [SimpleNamespace(name="x")], [1], {}), "shipped")
