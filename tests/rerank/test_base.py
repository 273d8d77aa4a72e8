"""The reranker contract, the registry (every entry through the same checks), building and
running specs, and the table labels and order of pipelines."""

import inspect
import logging

import numpy as np
import pytest

from retrbench.registry import EntryInfo
from retrbench.rerank import (
    RERANKERS,
    RankState,
    RerankerInfo,
    build_reranker,
    pipeline_label,
    pipeline_order,
    rerank,
)
from retrbench.specs import parse_pipeline
from retrbench.types import SearchResult
from retrbench.utils.linalg import exact_search as search

from .references import PAPER_VARIANTS, clustered, l2

# --------------------------------------------------------------------------- every entry


def random_problem(n_queries=5, n=60, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    q = l2(rng.standard_normal((n_queries, dim))).astype(np.float32)
    db = l2(rng.standard_normal((n, dim))).astype(np.float32)
    return q, db


@pytest.mark.parametrize("name", [e.name for e in RERANKERS])
@pytest.mark.parametrize("k", [None, 20])
def test_every_entry_with_defaults_gives_a_valid_ranking(name, k):
    q, db = random_problem()
    g = search(q, db, k=k)
    out = build_reranker(name)(RankState(q, db, g))
    kk = 60 if k is None else k
    assert out.result.indices.shape == (5, kk) and out.result.scores.shape == (5, kk)
    assert out.queries.shape == q.shape and out.database.shape == db.shape
    for row in out.result.indices.tolist():
        assert len(set(row)) == kk and min(row) >= 0 and max(row) < 60
    if k is None:  # the whole database ranked: each row a permutation
        assert np.all(np.sort(out.result.indices, axis=1) == np.arange(60))
    assert np.all(np.isfinite(out.result.scores))
    assert np.all(np.diff(out.result.scores, axis=1) <= 0)


@pytest.mark.parametrize("name", [e.name for e in RERANKERS])
def test_every_entry_has_metadata_and_a_canonical_spec(name):
    entry = RERANKERS.get(name)
    info = entry.info
    assert isinstance(info, RerankerInfo) and isinstance(info, EntryInfo)
    assert info.label.strip() and "+" not in info.label
    assert info.help.strip() and "\n" not in info.help
    # the help line names every parameter of the factory (with its default)
    for param in inspect.signature(entry.factory).parameters:
        assert f"{param}=" in info.help, (name, param)
    assert info.stage in ("database", "query", "ranking", "")
    assert str(parse_pipeline(name)) == name
    assert parse_pipeline(str(parse_pipeline(name))) == parse_pipeline(name)
    assert pipeline_label(name) == f"G+{info.label}"


def test_entry_labels_are_distinct():
    labels = [e.label for e in RERANKERS]
    assert len(labels) == len(set(labels)), labels


def test_registry_lists_methods():
    assert {"aqe", "dba", "dfs", "dfs-offline"} <= set(RERANKERS.list())
    assert "diffusion" in RERANKERS and "alpha-qe" in RERANKERS and "qe" in RERANKERS
    assert RERANKERS.get("dba").info.stage == "database"
    assert RERANKERS.get("aqe").info.stage == "query"
    # iteration follows the paper's Table 1 order of single steps
    assert [e.name for e in RERANKERS if e.name in ("aqe", "dba", "dfs", "dfs-offline")] == [
        "aqe",
        "dfs",
        "dba",
        "dfs-offline",
    ]


# --------------------------------------------------------------------------- labels and order


def test_pipeline_labels_follow_the_paper():
    assert [pipeline_label(s) for s in PAPER_VARIANTS] == [
        "G",
        "G+AQE",
        "G+DFS",
        "G+DBA",
        "G+AQE+DFS",
        "G+DBA+AQE",
        "G+DBA+DFS",
        "G+DBA+AQE+DFS",
    ]
    assert pipeline_label(None) == pipeline_label("g") == pipeline_label("") == "G"
    assert pipeline_label("qe") == "G+AQE"  # an alias has its entry's label
    assert pipeline_label("aqe:k=10,alpha=3") == "G+AQE(alpha=3,k=10)"
    assert pipeline_label("dfs-offline") == "G+DFS (offline)"
    assert pipeline_label("dfs-offline:trunc=100") == "G+DFS (offline, trunc=100)"
    assert pipeline_label("aqe+dba") == "G+AQE+DBA"  # the order written
    assert pipeline_label("foo+aqe") == "G+FOO+AQE"  # not registered: upper-case name
    assert pipeline_label(parse_pipeline("dba+aqe")) == "G+DBA+AQE"


def test_pipeline_order_sorts_the_paper_variants_into_table_1_order():
    shuffled = list(reversed(PAPER_VARIANTS))
    assert tuple(sorted(shuffled, key=pipeline_order)) == PAPER_VARIANTS
    assert pipeline_order("none") == (0, ())
    assert pipeline_order("dba+aqe+dfs") == (3, (0, 1, 2))
    assert pipeline_order("aqe+dba") == pipeline_order("dba+aqe")
    assert pipeline_order("dfs") < pipeline_order("dfs-offline") < pipeline_order("aqe+dfs")
    assert pipeline_order("foo") > pipeline_order("dfs-offline")


# --------------------------------------------------------------------------- building specs


def test_specs_parse_into_the_documented_steps():
    assert parse_pipeline("none").names == () and parse_pipeline("G").names == () and parse_pipeline("").names == ()
    assert parse_pipeline("dba+aqe").names == ("dba", "aqe")
    assert parse_pipeline("g+dba+aqe").names == ("dba", "aqe")
    assert parse_pipeline("aqe:k=10,alpha=3").steps[0].kwargs == {"k": 10, "alpha": 3}
    assert parse_pipeline("dfs:mode=offline,knn=exact").steps[0].kwargs == {"mode": "offline", "knn": "exact"}
    assert parse_pipeline("DFS:k=50,kq=10,alpha=0.99,gamma=3").steps[0].kwargs == {
        "k": 50,
        "kq": 10,
        "alpha": 0.99,
        "gamma": 3,
    }
    assert parse_pipeline("dba:k=2+aqe:k=2+dfs-offline:trunc=30").steps[2].kwargs == {"trunc": 30}


def test_bad_specs_fail_when_built_with_a_helpful_message():
    with pytest.raises(KeyError, match="unknown reranker 'aqee'; did you mean 'aqe'"):
        build_reranker("aqee")
    with pytest.raises(ValueError, match=r"'aqe:kk=3'.*unknown parameter 'kk'.*takes k, alpha"):
        build_reranker("aqe:kk=3")
    with pytest.raises(ValueError, match=r"'aqe:k=abc'.*bad parameter value"):
        build_reranker("aqe:k=abc")
    with pytest.raises(ValueError, match="key=value"):
        build_reranker("aqe:k")
    with pytest.raises(ValueError, match="empty step"):
        build_reranker("aqe++dfs")
    with pytest.raises(ValueError, match="takes no parameters"):
        build_reranker("g:k=2+aqe")
    with pytest.raises(ValueError, match="dfs: alpha"):
        build_reranker("dfs:alpha=1.5")
    with pytest.raises(ValueError, match="dfs: mode"):
        build_reranker("dfs:mode=sideways")
    with pytest.raises(ValueError, match="dfs: knn"):
        build_reranker("dfs:knn=magic")
    with pytest.raises(ValueError, match="dba: knn"):
        build_reranker("dba:knn=magic")


def test_text_values_are_case_insensitive(rng):
    q, db = clustered(rng)
    g = search(q, db)
    upper = rerank("DFS:MODE=Offline,KNN=EXACT,trunc=30", q, db, g)
    lower = rerank("dfs:mode=offline,knn=exact,trunc=30", q, db, g)
    online = rerank("dfs", q, db, g)
    np.testing.assert_array_equal(upper.indices, lower.indices)
    np.testing.assert_array_equal(upper.scores, lower.scores)
    assert not np.array_equal(upper.scores, online.scores)  # the offline mode was taken


def test_a_parsed_pipeline_runs_like_its_text(rng):
    q, db = clustered(rng)
    g = search(q, db)
    a = rerank("dba:k=3+aqe", q, db, g)
    b = rerank(parse_pipeline("dba:k=3+aqe"), q, db, g)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_steps_run_as_written_and_out_of_order_specs_warn(rng, caplog):
    q, db = clustered(rng)
    g = search(q, db)
    with caplog.at_level(logging.WARNING, logger="retrbench.rerank"):
        for spec in PAPER_VARIANTS:
            build_reranker(spec)
        assert not caplog.records
        swapped = build_reranker("aqe:k=2+dba:k=2")
        assert "canonical order" in caplog.text
    # not reordered: AQE on the original database, then DBA
    manual = build_reranker("dba:k=2")(build_reranker("aqe:k=2")(RankState(q, db, g)))
    np.testing.assert_array_equal(swapped(RankState(q, db, g)).result.indices, manual.result.indices)


def test_combination_runs_steps_in_order(rng):
    q, db = clustered(rng)
    g = search(q, db)
    combo = build_reranker("dba:k=2+aqe:k=2")(RankState(q, db, g))
    manual = build_reranker("aqe:k=2")(build_reranker("dba:k=2")(RankState(q, db, g)))
    np.testing.assert_array_equal(combo.result.indices, manual.result.indices)
    other = build_reranker("aqe:k=2")(RankState(q, db, g))
    assert not np.array_equal(combo.queries, other.queries)  # the expansion used the augmented database


def test_user_registered_reranker_composes(rng):
    q, db = clustered(rng)
    g = search(q, db)

    @RERANKERS.register("test-negate", info=RerankerInfo(stage="query", help="negated queries; scale=1"))
    def make_negate(scale: float = 1.0):
        def step(s: RankState) -> RankState:
            qn = -scale * s.queries
            return RankState(qn, s.database, search(qn, s.database, k=s.result.k))

        return step

    try:
        out = rerank("dba:k=2+test-negate:scale=1", q, db, g)
        aug = build_reranker("dba:k=2")(RankState(q, db, g)).database
        np.testing.assert_array_equal(out.indices, search(-q, aug).indices)
        assert pipeline_label("dba+test-negate") == "G+DBA+test-negate"  # the label defaults to the name
        with pytest.raises(ValueError, match="unknown parameter 'sign'"):
            build_reranker("test-negate:sign=1")
    finally:
        RERANKERS.unregister("test-negate")
    assert "test-negate" not in RERANKERS


# --------------------------------------------------------------------------- RankState and all variants


def test_rank_state_validates_shapes(rng):
    q, db = clustered(rng)
    g = search(q, db)
    with pytest.raises(ValueError, match="dimensions"):
        RankState(q[:, :8], db, g)
    with pytest.raises(ValueError, match="result rows"):
        RankState(q[:2], db, g)
    empty = SearchResult(np.full((6, 4), -np.inf), np.full((6, 4), -1))
    out = rerank("dfs:k=5", q, db, empty)  # nothing to fall back on: diffusion only, padded with -1
    assert out.indices.shape == (6, 4) and np.all(out.indices[:, 0] >= 0)


@pytest.mark.parametrize("k", [None, 25])
def test_every_paper_variant_gives_a_valid_ranking_that_reranking_changes(rng, k):
    q, db = clustered(rng, n_clusters=8, per=25, dim=32, noise=0.9)
    g = search(q, db, k=k)
    kk = g.k
    for spec in PAPER_VARIANTS + ("dfs-offline:trunc=100", "dba+aqe+dfs-offline:trunc=100"):
        out = rerank(spec, q, db, g)
        assert out.indices.shape == (len(q), kk), spec
        assert all(len(set(r)) == kk for r in out.indices.tolist()), spec
        assert out.indices.min() >= 0 and np.all(np.diff(out.scores, axis=1) <= 0), spec
        if spec != "none":
            assert not np.array_equal(out.indices, g.indices), spec
        else:
            np.testing.assert_array_equal(out.indices, g.indices)


def test_clamp_notes_name_every_parameter_larger_than_the_database():
    from retrbench.rerank import clamp_notes

    assert clamp_notes("aqe:k=5+dba:k=5", 10) == []
    assert clamp_notes("dba:k=10", 10) == ["dba: k=10 is more than the 9 other database vectors; 9 used"]
    assert clamp_notes("aqe:k=11", 10) == ["aqe: k=11 is more than the 10 database vectors; 10 used"]
    # defaults count too: dfs takes k=50 and kq=10 neighbours
    assert clamp_notes("dfs", 8) == [
        "dfs: k=50 is more than the 8 database vectors; 8 used",
        "dfs: kq=10 is more than the 8 database vectors; 8 used",
    ]
    assert clamp_notes("none", 3) == []
