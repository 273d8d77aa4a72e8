"""The reranker contract, its registry, and running a rerank pipeline.

A reranker is a callable ``RankState -> RankState``. Its registry entry holds a factory that
takes the step's parameters as keyword arguments and returns one, plus a
:class:`RerankerInfo` (table label, Table 1 order, one help line, which side it changes).

Specs
-----
A spec is parsed by :func:`retrbench.specs.parse_pipeline`, the grammar every spec shares:
``none`` (or ``g``, or an empty string) keeps the global-search ranking; otherwise ``+``-joined
steps, each a registered name with optional ``key=value`` parameters after a colon::

    aqe                      average query expansion, defaults on the entry's help line
    aqe:k=10,alpha=3         alpha-QE
    dba:k=2                  database-side augmentation
    dfs:k=50,kq=10,alpha=0.99,gamma=3
    dfs-offline:trunc=1000   (same as dfs:mode=offline)
    dba+aqe+dfs              the paper's G+DBA+AQE+DFS
    g+dba+aqe                ``g`` steps (global search, Table 1's "G") are ignored

An unknown name is a ``KeyError`` naming the closest registered ones; an unknown parameter
a ``ValueError`` naming the step and the parameter, raised when the spec is built, not when
it runs.

Order of combined steps
-----------------------
Steps run **in the order written**; nothing reorders them. Each step sees the state left by
the previous one, so ``dba+aqe`` expands the queries with the augmented database and
``aqe+dfs`` starts the diffusion from the expanded queries. The paper's combinations
(Table 1) are written in the canonical order, database augmentation of the database vectors
first, then query expansion, then diffusion: ``dba``, ``aqe``, ``dfs``, ``aqe+dfs``,
``dba+aqe``, ``dba+dfs``, ``dba+aqe+dfs``. A spec whose steps are out of that order
(``aqe+dba``) still runs as written, and a warning is logged, because it is a different
method. Tables sort pipelines by :func:`pipeline_order` and name them by
:func:`pipeline_label`.

Writing a reranker
------------------
One module that registers a factory, imported from ``retrbench/rerank/__init__.py``::

    from retrbench.rerank import RERANKERS, RankState, RerankerInfo
    from retrbench.utils.linalg import exact_search

    @RERANKERS.register("flip", info=RerankerInfo(stage="query", label="Flip", order=4,
                                                  help="negated queries; sign=-1"))
    def make_flip(sign: float = -1.0):
        def step(s: RankState) -> RankState:
            q = sign * s.queries
            return RankState(q, s.database, exact_search(q, s.database, k=s.result.k))
        return step

    rerank("flip:sign=-1+dfs", queries, database, result)

``tests/rerank/test_base.py`` runs every registered entry through the same checks.

Scores and reports
------------------
Besides the ranking (``result``, a top-``K`` list), a state may carry ``scores``: a
:class:`~retrbench.utils.linalg.DatabaseScores` giving *every* database item a score whose
full ranking ``result`` is the head of. Search, AQE and DBA define one (inner products of the
current queries and database), diffusion too (its scores, then the incoming ranking), so the
final ranking can be evaluated exactly over the whole database without sorting it
(:func:`retrbench.evaluation.exact_evaluation`). A step that cannot define one leaves ``None``
(the evaluation then reads the top-``K`` list).

Each step also adds a :class:`RerankReport` to ``reports``: whether it approximated anything
(an approximate kNN graph, ...) and the details (graph kind, index, ``nprobe``, recall against
exact search on a sample), so that result rows say what was approximated. A step written
without reports gets an empty one (``approximate=False``): a step that approximates must say so.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..registry import EntryInfo, Registry
from ..specs import Pipeline, Step, parse_pipeline
from ..types import SearchResult, as_rows
from ..utils.linalg import DatabaseScores

__all__ = [
    "RERANKERS",
    "RankState",
    "RerankReport",
    "Reranker",
    "RerankerInfo",
    "build_reranker",
    "clamp_notes",
    "pipeline_label",
    "pipeline_order",
    "progress_bar",
    "rerank",
    "rerank_progress",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RerankReport:
    """What one rerank step did that the result rows must show.

    Attributes:
        step: the step as written in the spec (``"dba:k=5"``); filled in by :func:`build_reranker`.
        approximate: whether the step approximated something exact (e.g. an approximate kNN graph).
        details: JSON-able details, e.g. ``{"graph": {"kind": "ivf", "index": "IVF2000,Flat",
            "params": {"nprobe": 8}, "recall": 0.97, "recall_sample": 1000, ...}}``.
    """

    step: str = ""
    approximate: bool = False
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "approximate": bool(self.approximate), **dict(self.details)}


@dataclass(frozen=True, eq=False)
class RankState:
    """What rerankers consume and produce.

    Attributes:
        queries: ``(Q, D)`` float32 L2-normalised query descriptors.
        database: ``(N, D)`` float32 L2-normalised database descriptors.
        result: current ranking of the database for each query, ``(Q, K)``, best first.
        scores: a score for every database item whose full ranking ``result`` is the head of,
            or None when the steps so far define none (see the module docstring).
        reports: one :class:`RerankReport` per step run so far.
    """

    queries: np.ndarray
    database: np.ndarray
    result: SearchResult
    scores: DatabaseScores | None = None
    reports: tuple[RerankReport, ...] = ()

    def __post_init__(self) -> None:
        q = as_rows(self.queries, "queries")
        db = as_rows(self.database, "database")
        if q.shape[1] != db.shape[1]:
            raise ValueError(f"RankState: queries {q.shape} and database {db.shape} have different dimensions")
        if self.result.indices.shape[0] != q.shape[0]:
            raise ValueError(f"RankState: {self.result.indices.shape[0]} result rows for {q.shape[0]} queries")
        if self.scores is not None and (self.scores.n_queries, self.scores.n_database) != (q.shape[0], db.shape[0]):
            raise ValueError(
                f"RankState: scores for {self.scores.n_queries} x {self.scores.n_database} but "
                f"{q.shape[0]} queries x {db.shape[0]} database vectors"
            )
        object.__setattr__(self, "queries", q)
        object.__setattr__(self, "database", db)
        object.__setattr__(self, "reports", tuple(self.reports))

    @property
    def approximate(self) -> bool:
        """Whether any step so far reported an approximation."""
        return any(r.approximate for r in self.reports)


_PROGRESS: contextvars.ContextVar[bool | None] = contextvars.ContextVar("retrbench_rerank_progress", default=None)


@contextlib.contextmanager
def rerank_progress(enabled: bool | None = True) -> Iterator[None]:
    """Show (True), hide (False) or auto-show on a terminal (None, the default) the rerankers'
    progress bars (graph building, diffusion) inside the ``with`` block."""
    token = _PROGRESS.set(enabled)
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar for rerank work (graph building, diffusion), shown as :func:`rerank_progress` says."""
    from tqdm.auto import tqdm

    flag = _PROGRESS.get()
    return tqdm(disable=None if flag is None else not flag, leave=False, **kwargs)


Reranker = Callable[[RankState], RankState]


@dataclass(frozen=True)
class RerankerInfo(EntryInfo):
    """Metadata carried on a reranker's registry entry (plus ``label``, ``order``, ``help``).

    Attributes:
        stage: ``"database"`` (changes the database vectors), ``"query"`` (changes the
            queries), ``"ranking"`` (reorders the result), or ``""`` when it does not
            matter; used only to warn about specs written out of the canonical order.
        reference: where the method and its defaults come from.
    """

    stage: str = ""
    reference: str = ""


# Factories take the step's parameters as keyword arguments and return a ``Reranker``.
RERANKERS: Registry[Reranker] = Registry("reranker", info_type=RerankerInfo)

_STAGE_ORDER = {"database": 0, "query": 1, "ranking": 2}
_UNKNOWN_ORDER = 1000  # pipeline_order of a step no entry is registered for: after every known one


def _build_step(step: Step) -> Reranker:
    """The reranker of one step; ``KeyError`` for an unknown name, ``ValueError`` for bad parameters."""
    entry = RERANKERS.get(step.name)
    kwargs = step.kwargs
    sig = inspect.signature(entry.factory)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    accepted = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = [k for k in kwargs if k not in accepted]
    if unknown and not takes_any:
        plural = "s" if len(unknown) > 1 else ""
        raise ValueError(
            f"rerank step {str(step)!r}: unknown parameter{plural} {', '.join(map(repr, unknown))} "
            f"({entry.name} takes {', '.join(accepted) or 'no parameters'})"
        )
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        raise ValueError(f"rerank step {str(step)!r}: {e}") from e
    try:
        return RERANKERS.create(step.name, **kwargs)
    except TypeError as e:  # a value of the wrong type, e.g. k=abc
        raise ValueError(f"rerank step {str(step)!r}: bad parameter value ({e})") from e


def _warn_if_out_of_order(pipe: Pipeline) -> None:
    stages = [(e.name, e.info.stage) for e in map(RERANKERS.get, pipe.names) if e.info.stage in _STAGE_ORDER]
    for (a, sa), (b, sb) in zip(stages, stages[1:], strict=False):
        if _STAGE_ORDER[sb] < _STAGE_ORDER[sa]:
            log.warning(
                "rerank spec %r runs %s (%s side) after %s (%s side); the canonical order is "
                "database augmentation, then query expansion, then diffusion",
                str(pipe),
                b,
                sb,
                a,
                sa,
            )


def _with_report(before: RankState, after: RankState, step: Step) -> RankState:
    """``after`` with the reports of ``before`` kept and this step's report(s) named (an empty
    one when the step made none)."""
    prior = before.reports
    kept = len(after.reports) >= len(prior) and all(a is b for a, b in zip(after.reports, prior, strict=False))
    mine = after.reports[len(prior) :] if kept else after.reports
    named = tuple(replace(r, step=r.step or str(step)) for r in mine) or (RerankReport(str(step)),)
    return replace(after, reports=prior + named)


def build_reranker(spec: str | Pipeline, *, progress: bool | None = None) -> Reranker:
    """One callable running every step of ``spec`` (text or parsed) in the order written.

    Each step's :class:`RerankReport` is added to the state's ``reports`` (named by the step);
    ``progress`` shows or hides the steps' progress bars (None: on a terminal).
    """
    pipe = parse_pipeline(spec, what="rerank spec")
    steps = [(step, _build_step(step)) for step in pipe]
    _warn_if_out_of_order(pipe)

    def run(state: RankState) -> RankState:
        with rerank_progress(progress) if progress is not None else contextlib.nullcontext():
            for step, fn in steps:
                state = _with_report(state, fn(state), step)
        return state

    return run


def rerank(spec: str | Pipeline, queries: np.ndarray, database: np.ndarray, result: SearchResult) -> SearchResult:
    """Apply ``spec`` to a global-search ``result`` (``(Q, K)``) and return the new ranking.

    Args:
        spec: rerank spec, e.g. ``"dba+aqe:k=5"``, or a parsed :class:`~retrbench.specs.Pipeline`.
        queries: ``(Q, D)`` L2-normalised query descriptors.
        database: ``(N, D)`` L2-normalised database descriptors.
        result: the ranking to rerank, ``(Q, K)``, best first.
    """
    return build_reranker(spec)(RankState(queries, database, result)).result


def _step_label(step: Step) -> str:
    label = RERANKERS.label(step.name) if step.name in RERANKERS else step.name.upper()
    if not step.params:
        return label
    params = str(step).partition(":")[2]
    if label.endswith(")"):  # "DFS (offline)" -> "DFS (offline, trunc=100)"
        return f"{label[:-1]}, {params})"
    return f"{label}({params})"


def pipeline_label(spec: str | Pipeline | None) -> str:
    """Table label of a rerank spec: the entries' labels after ``G`` (global search), in the
    order written, parameters in parentheses.

    ``none`` -> ``G``; ``dba+aqe`` -> ``G+DBA+AQE``; ``aqe:k=5`` -> ``G+AQE(k=5)``;
    ``dfs-offline`` -> ``G+DFS (offline)``. Unregistered names are shown upper-case.
    """
    pipe = parse_pipeline(spec, what="rerank spec")
    return "+".join(["G", *(_step_label(s) for s in pipe)])


def pipeline_order(spec: str | Pipeline | None) -> tuple[int, tuple[int, ...]]:
    """Sort key of a rerank spec in tables: ``(number of steps, sorted step orders)``.

    With the entries' orders (aqe 0, dfs 1, dba 2, dfs-offline 3) this gives Table 1's column
    order G, AQE, DFS, DBA, AQE+DFS, DBA+AQE, DBA+DFS, DBA+AQE+DFS. Unregistered names sort
    after every registered one.
    """
    pipe = parse_pipeline(spec, what="rerank spec")
    orders = [RERANKERS.get(n).info.order if n in RERANKERS else _UNKNOWN_ORDER for n in pipe.names]
    return (len(orders), tuple(sorted(orders)))


_SIZE_PARAMS = ("k", "kq")  # neighbour counts (a truncation length above N is no approximation)


def clamp_notes(spec: str | Pipeline, n_database: int) -> list[str]:
    """One note per step parameter (given or default) that asks for more database vectors than
    there are, and is therefore clamped when the step runs: e.g. ``dba: k=50 is more than the 9
    other database vectors; 9 used``. Database-side steps exclude each vector itself."""
    notes = []
    for step in parse_pipeline(spec, "rerank spec"):
        entry = RERANKERS.get(step.name)
        params = inspect.signature(entry.factory).parameters
        for key in _SIZE_PARAMS:
            if key not in params:
                continue
            value = step.kwargs.get(key, params[key].default)
            own = entry.info.stage == "database" and key == "k"
            limit = n_database - 1 if own else n_database
            if isinstance(value, int) and value > limit:
                what = f"the {limit} other database vectors" if own else f"the {limit} database vectors"
                notes.append(f"{step.name}: {key}={value} is more than {what}; {limit} used")
    return notes
