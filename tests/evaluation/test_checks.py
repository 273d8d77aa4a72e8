"""retrbench.evaluation.checks: rankings with repeated or out-of-range ids are refused, naming row and value."""

from __future__ import annotations

import numpy as np
import pytest

from retrbench.evaluation import check_gnd_range, check_ranks, compute_map, evaluate, gnd_from_pickle, per_query_ap
from retrbench.evaluation import checks as ck
from retrbench.types import SearchResult


@pytest.fixture(params=["sort", "table"])
def method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the row-sorting and with the position-table repeat finder."""
    monkeypatch.setattr(ck, "_SORT_MAX_K", 10**9 if request.param == "sort" else 1)
    return request.param


def slow_first_repeat(ranks: np.ndarray) -> tuple[int, int] | None:
    """(row, id) of the first entry, row by row, that repeats an earlier id of its row (-1 excepted)."""
    for q, row in enumerate(ranks.tolist()):
        seen: set[int] = set()
        for v in row:
            if v != -1 and v in seen:
                return q, v
            seen.add(v)
    return None


# --------------------------------------------------------------------------- repeats


def test_repeated_id_in_a_row_is_refused(method: str) -> None:
    ranks = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2], [2, 1, 2, 0]])
    with pytest.raises(ValueError, match=r"^ranks row 3 lists database id 2 twice \(positions 0, 2\)"):
        check_ranks(ranks)
    ranks[3] = [1, 1, 1, 0]
    with pytest.raises(ValueError, match=r"ranks row 3 lists database id 1 3 times \(positions 0, 1, 2\)"):
        check_ranks(ranks, n_database=4)


def test_padding_may_repeat(method: str) -> None:
    ranks = np.array([[4, -1, -1, 2, -1], [-1, -1, -1, -1, -1], [0, 1, 2, 3, 4]])
    assert check_ranks(ranks, n_database=5) is ranks  # returned as given, not copied
    ranks[0, 2] = 2
    with pytest.raises(ValueError, match="ranks row 0 lists database id 2 twice"):
        check_ranks(ranks)


def test_first_repeat_matches_a_slow_loop(method: str) -> None:
    rng = np.random.default_rng(5)
    for _ in range(40):
        nq, k, n = 30, int(rng.integers(2, 60)), 80
        ranks = np.stack([rng.permutation(n)[:k] for _ in range(nq)])
        ranks[rng.random(ranks.shape) < 0.1] = -1
        for _ in range(int(rng.integers(0, 3))):  # plant repeats in random rows
            q, a, b = int(rng.integers(nq)), int(rng.integers(k)), int(rng.integers(k))
            if a != b and ranks[q, a] != -1:
                ranks[q, b] = ranks[q, a]
        want = slow_first_repeat(ranks)
        if want is None:
            check_ranks(ranks, n)
        else:
            with pytest.raises(ValueError, match=rf"^ranks row {want[0]} lists database id "):
                check_ranks(ranks, n)


def test_duplicates_no_longer_give_map_above_100() -> None:
    # before check_ranks, listing the one positive 5 times gave Easy mAP 511.16 % style numbers
    gnd = [{"easy": [7], "hard": [], "junk": []}]
    ranks = np.array([[7, 7, 7, 7, 7, 1, 2]])
    with pytest.raises(ValueError, match="ranks row 0 lists database id 7 5 times"):
        evaluate(ranks, gnd)
    with pytest.raises(ValueError, match="lists database id 7"):
        compute_map(ranks, [{"ok": [7]}])
    with pytest.raises(ValueError, match="lists database id 7"):
        per_query_ap(ranks, gnd)
    with pytest.raises(ValueError, match="lists database id 7"):
        evaluate(SearchResult(np.zeros(ranks.shape), ranks), [{"ok": [7], "junk": []}], "gldv2")


# --------------------------------------------------------------------------- ranges


def test_ids_beyond_the_database_are_refused() -> None:
    gnd = [{"ok": [0], "junk": []}] * 2
    ranks = np.array([[0, 1, 2], [2, 1, 5000]])
    evaluate(ranks, gnd, "classic")  # without the database size only repeats and negatives are checked
    with pytest.raises(ValueError, match=r"^ranks row 1 has id 5000 \(position 2\) but the database has 4993 images \(ids 0\.\.4992\)$"):
        evaluate(ranks, gnd, "classic", n_database=4993)
    with pytest.raises(ValueError, match=r"ranks row 0 has id 1 \(position 1\) but the database has 1 images \(ids 0\.\.0\)"):
        check_ranks(ranks, n_database=np.int64(1))
    with pytest.raises(ValueError, match="the database is empty"):
        check_ranks(ranks, 0)
    with pytest.raises(ValueError, match="n_database must be >= 0"):
        check_ranks(ranks, -3)
    with pytest.raises(TypeError, match="n_database"):
        check_ranks(ranks, 4.5)  # type: ignore[arg-type]


def test_negative_ids_name_the_row() -> None:
    ranks = np.array([[0, 1, 2], [2, -7, 0]])
    with pytest.raises(ValueError, match=r"^ranks row 1 has id -7 \(position 1\): database ids are >= 0, or -1 for nothing$"):
        evaluate(ranks, [{"ok": [0], "junk": []}] * 2, "classic")
    with pytest.raises(ValueError, match="ranks row 1 has id -7"):
        check_ranks(ranks)


def test_first_bad_row_is_named_whatever_the_fault() -> None:
    ranks = np.array([[0, 1, 2], [0, 9, 1], [-5, 0, 1]])
    with pytest.raises(ValueError, match="ranks row 1 has id 9"):
        check_ranks(ranks, 3)
    with pytest.raises(ValueError, match="ranks row 2 has id -5"):
        check_ranks(ranks)


def test_ground_truth_ids_beyond_the_database() -> None:
    raw = {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q0", "q1", "q2", "q3"],
        "gnd": [{"easy": [0], "hard": [], "junk": []}] * 3 + [{"easy": [1], "hard": [2], "junk": [0, 3]}],
    }
    # before: silently counted (an id >= len(imlist) is an image the ranking can never list)
    with pytest.raises(ValueError, match=r"^gnd\[3\]\['junk'\] has database id 3 but the database has 3 images \(ids 0\.\.2\)$"):
        gnd_from_pickle(raw, "revisited")
    with pytest.raises(ValueError, match=r"gnd\[3\]\['junk'\] has database id 3"):
        gnd_from_pickle(raw["gnd"], "revisited", n_database=3)
    gnd_from_pickle(raw["gnd"], "revisited")  # a bare list without a size: nothing to check against
    ranks = np.tile(np.arange(3), (4, 1))
    with pytest.raises(ValueError, match=r"gnd\[3\]\['junk'\] has database id 3"):
        evaluate(ranks, raw["gnd"], n_database=3)
    with pytest.raises(ValueError, match=r"gnd\[3\]\['junk'\] has database id 3"):
        compute_map(ranks, [{"ok": g["easy"], "junk": g["junk"]} for g in raw["gnd"]], n_database=3)
    with pytest.raises(ValueError, match=r"gt\.pkl\[3\]\['hard'\] has database id 2 but the database has 2"):
        check_gnd_range(raw["gnd"], ("easy", "hard", "junk"), 2, source="gt.pkl")
    check_gnd_range([{"ok": [5]}], ("ok", "junk"), None)  # no size: nothing checked


# --------------------------------------------------------------------------- valid input is unchanged


def test_valid_rankings_give_the_same_numbers_with_the_checks(rng: np.random.Generator) -> None:
    nq, n_db = 25, 300
    gnd = []
    for q in range(nq):
        ids = rng.choice(n_db, size=20, replace=False)
        gnd.append({"easy": ids[: q % 6], "hard": ids[6:9], "junk": ids[9:12]})
    scores = rng.standard_normal((nq, n_db))
    ranks = np.argsort(-scores, axis=1)
    full = evaluate(ranks, gnd, n_database=n_db)
    assert full == evaluate(ranks, gnd)
    top = ranks[:, :50].copy()
    top[::4, -5:] = -1  # faiss-style padding
    assert evaluate(top, gnd, n_database=n_db) == evaluate(top, gnd)
    merged = [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"]} for g in gnd]
    a, b = compute_map(ranks, merged, n_database=n_db), compute_map(ranks, merged)
    assert a.map == b.map and np.array_equal(a.aps, b.aps, equal_nan=True)
