"""The evaluation half and the whole run: where the stages meet: dataset -> backbone -> extraction -> whitening ->
search -> rerank -> evaluation -> tidy results. The CLI and notebooks both call :func:`run`.

Every stage is built from the registries before anything is extracted (:func:`check_config`),
so a misspelt pooling or reranker fails in a second instead of after the extraction.
"""


from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..backbones import Backbone
from ..config import RunConfig, config_id
from ..datasets import default_resize
from ..evaluation import PROTOCOLS, evaluate, exact_evaluation, per_query_ap
from ..rerank import RankState, build_reranker, clamp_notes
from ..results import RunResult, append_results, check_results_dir, tidy_rows
from ..search import search_index
from ..utils.linalg import InnerProductScores, l2_normalize
from ..whitening import postprocess
from .features import DatasetFeatures, _image_ids, _labels, check_config, extract_features

__all__ = ["Evaluation", "WhiteningNote", "evaluate_features", "run"]

log = logging.getLogger(__name__)


class WhiteningNote(UserWarning):
    """Warned when the whitening dimension had to be capped (see ``RunResult.info['whitening']``)."""


def _ranking_length(n_database: int, protocol: str, topk: int | None) -> int:
    if topk is not None:
        return min(topk, n_database)
    if protocol == "gldv2":
        return min(100, n_database)
    return n_database if n_database <= 100_000 else 1000


@dataclass
class Evaluation:
    """What :func:`evaluate_features` computes from descriptors.

    Attributes:
        result: the final ranking, ``(Q, K)`` scores and database indices, best first.
        metrics: the protocol's metrics.
        query_ap: per split, ``(Q,)`` AP of each query (fractions; NaN without positives).
        whitening: dimension used, cap and note (see :func:`~retrbench.whitening.postprocess`).
        rerank_notes: clamps of rerank parameters to the database size.
        timings: seconds of post-processing, search and reranking.
        provenance: how it was evaluated, for the rows: ``evaluation`` (``exact``: the full
            ranking's metrics, counted from the scores; ``top-k``: the ranked list),
            ``ranking_length`` (evaluated), ``result_length``, ``index`` and its measured
            recall, the rerank steps' reports and ``approximate`` (anything approximated).
    """

    result: Any
    metrics: list[Any]
    query_ap: dict[str, np.ndarray]
    whitening: dict[str, Any]
    rerank_notes: list[str]
    timings: dict[str, float]
    provenance: dict[str, Any] = field(default_factory=dict)


def evaluate_features(
    database: np.ndarray,
    queries: np.ndarray,
    gnd: Any,
    protocol: str,
    *,
    whiten: int | None = None,
    train: np.ndarray | None = None,
    rerank: str | Any = "none",
    topk: int | None = None,
    postprocess_fn: Callable[..., tuple[np.ndarray, np.ndarray, dict[str, Any]]] | None = None,
    label: str = "",
    index: str = "flat",
    nprobe: int | None = None,
    efsearch: int | None = None,
    index_train_size: int | None = None,
    progress: bool = False,
) -> Evaluation:
    """L2 -> (PCA-whitening -> L2) -> exact search -> rerank -> metrics, on descriptors from any
    source: ``database`` ``(N, D)`` and ``queries`` ``(Q, D)`` with the ground truth ``gnd``
    (``Q`` per-query dicts) of ``protocol``. ``run`` calls exactly this after extraction.

    ``whiten`` learns PCA-whitening on ``train`` (default: the database); ``rerank`` is a
    rerank spec; ``topk`` truncates the ranking (default: the protocol's rule for the list
    handed to the rerankers; the metrics are then those of the full ranking, counted from the
    scores, whenever the search is exact and every rerank step defines a score for every database
    item). ``index`` is ``flat`` (exact) or a faiss ``index_factory`` string, whose recall against
    exact search is measured and reported. A capped whitening dimension is warned
    (:class:`WhiteningNote`) and logged, prefixed by ``label``.
    """
    reranker = build_reranker(rerank)
    PROTOCOLS.get(protocol)
    n = int(np.shape(database)[0])
    t0 = time.perf_counter()
    dbw, qw, winfo = (postprocess_fn or postprocess)(database, queries, whiten, train)
    t_post = time.perf_counter() - t0
    if winfo.get("note"):
        log.warning("%s%s", f"{label}: " if label else "", winfo["note"])
        warnings.warn(f"{label}: {winfo['note']}" if label else winfo["note"], WhiteningNote, stacklevel=3)

    t0 = time.perf_counter()
    k = _ranking_length(dbw.shape[0], protocol, topk)
    result, sinfo = search_index(qw, dbw, k, index, nprobe=nprobe, efsearch=efsearch, train_size=index_train_size, progress=progress)
    t_search = time.perf_counter() - t0
    notes = clamp_notes(rerank, dbw.shape[0])
    for note in notes:
        log.warning("%s%s", f"{label}: " if label else "", note)
    t0 = time.perf_counter()
    scores = InnerProductScores(qw, dbw) if sinfo.get("exact") else None
    state = reranker(RankState(qw, dbw, result, scores=scores))
    result = state.result
    t_rerank = time.perf_counter() - t0
    if topk is None and state.scores is not None:
        ex = exact_evaluation(state.scores, gnd, protocol, progress=progress)
        metrics, query_ap, length, how = ex.metrics, ex.query_ap, ex.ranking_length, "exact"
    else:
        metrics = evaluate(result.indices, gnd, protocol, n_database=n)
        query_ap = per_query_ap(result.indices, gnd, protocol, n_database=n)
        length, how = int(result.k), "top-k"
    truncated = topk is None and how == "top-k" and int(result.k) < n and protocol != "gldv2"
    provenance = {
        "evaluation": how,
        "ranking_length": int(length),
        "result_length": int(result.k),
        "index": sinfo.get("index", index),
        "index_info": {k_: v for k_, v in sinfo.items() if k_ not in ("index",)},
        "rerank_reports": [r.to_dict() for r in state.reports],
        "approximate": bool(not sinfo.get("exact") or state.approximate or truncated),
    }
    timings = {"postprocess_s": t_post, "search_s": t_search, "rerank_s": t_rerank}
    return Evaluation(result, metrics, query_ap, winfo, notes, timings, provenance)


def _shipped_whitening(feats: DatasetFeatures, spec: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Database and queries L2-normalised and whitened by the checkpoint's own whitening
    (``shipped`` or ``shipped:NAME``); returns them and a description for the rows."""
    if len(feats.backbones) != 1:
        raise ValueError("whiten=shipped applies one checkpoint's whitening: not for ensembles")
    backbone = feats.backbones[0]
    if not callable(getattr(backbone, "whiten_shipped", None)):
        raise ValueError(f"model {backbone.name!r} ships no whitening; use a dimension or none")
    name = spec.partition(":")[2] or None
    db = backbone.whiten_shipped(l2_normalize(np.asarray(feats.database)), name)
    q = backbone.whiten_shipped(l2_normalize(np.asarray(feats.queries)), name)
    return np.asarray(db, dtype=np.float32), np.asarray(q, dtype=np.float32), f"{backbone.name}: {name or 'its only'} shipped whitening"


def run(
    config: RunConfig | None = None,
    *,
    results_dir: str | Path | None = "results",
    progress: bool = False,
    backbones: dict[tuple[str, str | None], Backbone] | None = None,
    postprocess_fn: Callable[..., tuple[np.ndarray, np.ndarray, dict[str, Any]]] | None = None,
    **overrides: Any,
) -> RunResult:
    """Run one benchmark and return its metrics: :func:`extract_features`, then
    :func:`evaluate_features`, then tidy rows.

    ``rb.run(model="efficientnet_lite0", dataset="demo", pooling="rmac", whiten=None)`` is the
    same as ``retrbench run --model ... --dataset ...``. Keyword overrides replace fields of
    ``config`` (default :class:`RunConfig`). Tidy rows are appended to
    ``<results_dir>/results.jsonl`` (default ``results/``, as the CLI; ``None`` skips);
    the folder is checked before any work.

    A model spec ``a+b`` is an ensemble: each model's descriptors are L2-normalised and
    concatenated, then post-processed together (PCA-whitening reduces the concatenation, as
    the paper does). ``backbones`` is an optional memo of built models, shared across calls
    (sweeps use it so that a model is loaded once). ``postprocess_fn`` replaces
    :func:`~retrbench.whitening.postprocess` (sweeps pass a memo that fits each PCA once).

    A whitening dimension capped to what the training set allows is reported with a
    :class:`WhiteningNote` warning (and logged), so notebooks see it too.
    """
    cfg = (config or RunConfig()).replace(**overrides) if overrides else (config or RunConfig())
    plan = check_config(cfg)
    if results_dir is not None:
        check_results_dir(results_dir)
    t_start = time.perf_counter()
    feats = extract_features(cfg, progress=progress, backbones=backbones, plan=plan)
    ds = feats.dataset
    database, queries, whiten, shipped = feats.database, feats.queries, cfg.whiten, None
    if isinstance(cfg.whiten, str):  # the checkpoint's own whitening, as its authors evaluate
        database, queries, shipped = _shipped_whitening(feats, cfg.whiten)
        whiten = None
    ev = evaluate_features(
        database,
        queries,
        ds.gnd,
        ds.protocol,
        whiten=whiten,
        train=feats.train,
        rerank=cfg.rerank,
        topk=cfg.topk,
        index=cfg.index,
        nprobe=cfg.nprobe,
        efsearch=cfg.efsearch,
        index_train_size=cfg.index_train_size,
        progress=progress,
        postprocess_fn=postprocess_fn,
        label=f"{cfg.model} on {cfg.dataset}",
    )
    database_ids, query_ids = _image_ids(ds)
    provenance = {
        "config_id": config_id(cfg),
        **_labels(cfg, feats.backbones, ds),
        "weights_sha256": "+".join(b.weights_id for b in feats.backbones),
        "image_size_used": feats.image_sizes[0] if len(set(feats.image_sizes)) == 1 else "+".join(map(str, feats.image_sizes)),
        "exif_orientation": ds.exif_orientation if cfg.exif is None else cfg.exif,
        "resize_used": cfg.resize or default_resize(cfg.dataset),
        "dim": int(ev.whitening["dim"]),
        "n_database": len(ds.images),
        "n_queries": len(ds.queries),
        **ev.provenance,
        "whitening": ev.whitening if shipped is None else {**ev.whitening, "requested_dim": cfg.whiten, "shipped": shipped},
        "rerank_notes": ev.rerank_notes,
        "dataset_notes": dict(ds.notes),
        "retrbench_version": __version__,
    }
    rows = tidy_rows(cfg, ev.metrics, protocol=ds.protocol, provenance=provenance)
    info = dict(feats.info)
    info.update(ev.timings, total_s=time.perf_counter() - t_start, whitening=ev.whitening, dataset_notes=dict(ds.notes))
    if results_dir is not None:
        info["results_file"] = str(append_results(rows, results_dir))
    return RunResult(cfg, rows, info, ev.result, query_ids=tuple(query_ids), database_ids=tuple(database_ids), query_ap=ev.query_ap)
