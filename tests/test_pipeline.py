"""End to end on the built-in demo dataset, through the public API."""

import numpy as np
import pytest

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
    np.testing.assert_array_less(0, res.metrics.value.to_numpy() + 1e-9)
