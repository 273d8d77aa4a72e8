"""Full-ranking scores of rerank states: every paper variant defines scores whose ranking is
the state's ranking, so the exact evaluation of a top-K state equals that of the full one."""

import numpy as np
import pytest

from retrbench.evaluation import evaluate, exact_evaluation
from retrbench.rerank import RankState, RerankReport, build_reranker
from retrbench.utils.linalg import InnerProductScores
from retrbench.utils.linalg import exact_search as search

from .references import PAPER_VARIANTS, clustered


def start(q, db, k=None):
    return RankState(q, db, search(q, db, k), scores=InnerProductScores(q, db))


@pytest.mark.parametrize("spec", PAPER_VARIANTS + ("dfs-offline", "dba+dfs-offline"))
def test_scores_rank_like_the_state(rng, spec):
    q, db = clustered(rng)
    n = db.shape[0]
    full = build_reranker(spec)(start(q, db))
    assert full.scores is not None
    top = full.scores.top_k(n)
    np.testing.assert_array_equal(top.indices, full.result.indices)
    np.testing.assert_allclose(top.scores, full.result.scores, rtol=1e-6, atol=1e-7)
    # the same method started from a top-20 list: its scores still give the full ranking's metrics
    gnd = [
        {"easy": np.arange(i * 12, i * 12 + 6), "hard": np.arange(i * 12 + 6, i * 12 + 10), "junk": np.array([i])}
        for i in range(len(q))
    ]
    short = build_reranker(spec)(start(q, db, k=20))
    assert short.result.k == 20
    if "aqe" in spec and "dfs" not in spec:  # AQE expands with the top-k: the same from a top-20 list
        np.testing.assert_array_equal(short.result.indices, full.result.indices[:, :20])
    want = evaluate(full.result.indices, gnd, "revisited")
    assert exact_evaluation(full.scores, gnd, "revisited").metrics == want


def test_no_scores_without_a_start(rng):
    """A state without full-ranking scores stays without for the query-side and ranking steps;
    DBA defines new ones (a new database, searched exactly)."""
    q, db = clustered(rng)
    g = search(q, db)
    assert build_reranker("dfs")(RankState(q, db, g)).scores is None
    assert build_reranker("aqe")(RankState(q, db, g)).scores is not None
    assert build_reranker("dba")(RankState(q, db, g)).scores is not None


def test_reports_name_steps_and_survive_steps_without_reports(rng):
    q, db = clustered(rng)

    def silent(s):  # a third-party step that knows nothing of reports or scores
        return RankState(s.queries * 1.0, s.database, s.result)

    def loud(s):
        return RankState(s.queries, s.database, s.result, s.scores, (RerankReport(approximate=True, details={"x": 1}),))

    from retrbench.rerank.base import _with_report

    s0 = start(q, db)
    s1 = _with_report(s0, build_reranker("aqe")(s0), "aqe")
    assert [r.step for r in s1.reports] == ["aqe"]  # named already: kept
    s2 = _with_report(s1, silent(s1), "silent")
    assert [r.step for r in s2.reports] == ["aqe", "silent"] and not s2.approximate
    s3 = _with_report(s2, loud(s2), "loud")
    assert s3.reports[-1] == RerankReport("loud", True, {"x": 1}) and s3.approximate
    assert s3.reports[-1].to_dict() == {"step": "loud", "approximate": True, "x": 1}
    out = build_reranker("dba+aqe+dfs")(start(q, db))
    assert [r.step for r in out.reports] == ["dba", "aqe", "dfs"]
    assert out.reports[2].to_dict()["cg"]["maxiter"] == 20
    with pytest.raises(ValueError, match="scores for"):
        RankState(q, db, search(q, db), scores=InnerProductScores(q[:2], db))
