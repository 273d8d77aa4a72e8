"""Descriptor files in and out: ``retrbench extract`` / ``retrbench evaluate --features`` and
their notebook twins :func:`extract` and :func:`evaluate_descriptors`.

Extraction and evaluation are the pipeline's own (:func:`retrbench.pipeline.extract_features`,
:func:`retrbench.pipeline.evaluate_features`), so descriptors written here and evaluated later give
exactly the numbers of ``retrbench run``; the file formats and their checks are in
:mod:`retrbench.descriptors`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ._version import __version__
from .backbones import Backbone
from .config import RunConfig, config_id
from .evaluation import PROTOCOLS, evaluate
from .pipeline import evaluate_features, extract_features
from .pipeline.features import _image_ids, _labels
from .rerank import build_reranker, pipeline_label
from .results import RunResult, tidy_rows
from .types import RetrievalDataset

__all__ = ["evaluate_descriptors", "extract"]



def extract(
    config: RunConfig | None = None,
    *,
    progress: bool = False,
    backbones: dict[tuple[str, str | None], Backbone] | None = None,
    **overrides: Any,
) -> Any:
    """The descriptors :func:`run` would post-process, with their image ids and configuration,
    as a :class:`~retrbench.descriptors.Descriptors`::

        rb.extract(model="efficientnet_lite0", dataset="demo").save("demo.npz")

    Keyword overrides replace fields of ``config`` (default :class:`RunConfig`), as in :func:`run`.
    The descriptors are pooled, neither L2-normalised nor whitened (for an ensemble ``a+b``: the
    concatenation of each model's L2-normalised descriptors); ``database_ids`` are the dataset's
    image paths in its order, ``query_ids`` the query images in ground-truth order. Whitening,
    reranking and ``topk`` act at evaluation (:func:`evaluate_descriptors`): passing them here is
    a ``ValueError``, and a ``config`` that sets them is extracted without them (they are not in
    the file's ``config``, which holds every other field plus ``weights_sha256``,
    ``image_size_used`` and ``retrbench_version``).
    """
    from .descriptors import DESCRIPTOR_FORMAT, DESCRIPTOR_NOTE, EVALUATION_FIELDS, Descriptors

    late = sorted(k for k, v in overrides.items() if k in EVALUATION_FIELDS and v is not None and str(v).lower() != "none")
    if late:
        raise ValueError(f"extract: {', '.join(late)} act on descriptors after extraction; give them to evaluate_descriptors (or retrbench evaluate --features)")
    cfg = (config or RunConfig()).replace(**overrides) if overrides else (config or RunConfig())
    reset = {"whiten": None, "whiten_source": None, "rerank": "none", "topk": None}
    cfg = cfg.replace(**{k: v for k, v in reset.items() if k in EVALUATION_FIELDS and hasattr(cfg, k)})
    feats = extract_features(cfg, progress=progress, backbones=backbones)
    ds = feats.dataset
    database_ids, query_ids = _image_ids(ds)
    labels = _labels(cfg, feats.backbones, ds)
    sizes = feats.image_sizes
    config = {
        "format": DESCRIPTOR_FORMAT,
        "descriptor": DESCRIPTOR_NOTE,
        **{k: v for k, v in cfg.to_dict().items() if k not in EVALUATION_FIELDS},
        "model_label": labels["model_label"],
        "pooling_label": labels["pooling_label"],
        "dataset_label": labels["dataset_label"],
        "weights_sha256": "+".join(b.weights_id for b in feats.backbones),
        "image_size_used": sizes[0] if len(set(sizes)) == 1 else "+".join(map(str, sizes)),
        "exif_orientation": ds.exif_orientation if cfg.exif is None else cfg.exif,
        "protocol": ds.protocol,
        "n_database": len(ds.images),
        "n_queries": len(ds.queries),
        "dataset_notes": dict(ds.notes),
        "retrbench_version": __version__,
    }
    return Descriptors(feats.database, feats.queries, tuple(database_ids), tuple(query_ids), config, source=f"{cfg.model} on {cfg.dataset}")


def _ground_truth(gnd: Any, protocol: str | None) -> tuple[list[str], list[str], Any, str, str, str]:
    """``(database names, query names, gnd as evaluate takes it, protocol, how to name it, dataset)``."""
    from collections.abc import Mapping

    from .datasets import load_gnd_pickle
    from .evaluation import gnd_from_pickle

    if isinstance(gnd, RetrievalDataset):
        names, qnames = _image_ids(gnd)
        return names, qnames, gnd.gnd, protocol or gnd.protocol, gnd.name, gnd.name
    if isinstance(gnd, Mapping):
        data, reference, dataset = gnd, "the ground truth", ""
    else:
        data, reference = load_gnd_pickle(gnd), Path(gnd).name
        dataset = Path(gnd).stem.removeprefix("gnd_")
    protocol = protocol or "revisited"
    return [str(s) for s in data["imlist"]], [str(s) for s in data["qimlist"]], gnd_from_pickle(data, protocol), protocol, reference, dataset


def evaluate_descriptors(
    features: Any,
    gnd: Any,
    protocol: str | None = None,
    *,
    whiten: int | None = None,
    whiten_features: Any = None,
    rerank: str | Any = "none",
    topk: int | None = None,
    kappas: tuple[int, ...] = (1, 5, 10),
) -> RunResult:
    """L2 -> (PCA-whitening -> L2) -> search -> rerank -> metrics on descriptors from a file or
    :func:`extract`: :func:`evaluate_features`, the code :func:`run` runs after extraction.

    Args:
        features: a :class:`~retrbench.descriptors.Descriptors` or a descriptor file: ``.npz``,
            ``.h5``, a folder of ``.npy``, or revisitop's ``.mat`` (``X`` / ``Q`` columns); see
            :mod:`retrbench.descriptors`.
        gnd: the ground truth: a ``gnd_*.pkl`` path, its loaded dict (``imlist``, ``qimlist``,
            ``gnd``), or a :class:`~retrbench.types.RetrievalDataset` (``rb.load_dataset("demo")``).
            Rows are matched to its images by the file's ids (reordered when they are a
            permutation, refused when they name other images), by position without ids.
        protocol: evaluation protocol; default the dataset's, ``revisited`` for a pickle.
        whiten: PCA-whitening output dimension; None keeps the L2-normalised descriptors.
        whiten_features: what the whitening is learned on: a descriptor file or ``Descriptors``
            (its ``database``) or an ``(n, D)`` array; default the evaluated database.
        rerank: a rerank spec (``"dba+aqe"``); topk: ranking length (default: the protocol's rule).
        kappas: the k of mP@k.

    Returns:
        a :class:`~retrbench.results.RunResult` (``.metrics``, ``.table()``, ``.per_query``,
        ``.result``), not appended to any results file. Its rows carry the file's configuration
        when retrbench wrote it (then ``config_id`` equals :func:`run`'s for the same options);
        otherwise the model is named after the file and the pooling is left empty.
    """
    from dataclasses import fields

    from .descriptors import EVALUATION_FIELDS, Descriptors, load_descriptors

    desc = features if isinstance(features, Descriptors) else load_descriptors(features)
    names, qnames, gnd_list, protocol, reference, dataset = _ground_truth(gnd, protocol)
    PROTOCOLS.get(protocol)
    build_reranker(rerank)  # a bad spec fails before any work
    desc = desc.aligned(names, qnames, reference=reference)
    src = desc.source or "descriptors"
    train, train_src, train_cfg = None, None, {}
    if whiten_features is not None:
        if whiten is None:
            raise ValueError("whiten_features is the whitening's training set: give a whitening dimension (whiten=D) too")
        if isinstance(whiten_features, (Descriptors, str, Path)):
            t = whiten_features if isinstance(whiten_features, Descriptors) else load_descriptors(whiten_features)
            train, train_src, train_cfg = t.database, t.source or "whitening descriptors", t.config
        else:
            arr = np.asarray(whiten_features)
            train = Descriptors(arr, arr[:0], source="whiten_features").database  # checked as a file's would be
            train_src = "whiten_features"
        if train.shape[1] != desc.dim:
            raise ValueError(f"{train_src}: whitening descriptors have D={train.shape[1]} but {src} has D={desc.dim}")

    ev = evaluate_features(desc.database, desc.queries, gnd_list, protocol, whiten=whiten, train=train, rerank=rerank, topk=topk, label=src)
    n = desc.database.shape[0]
    metrics = ev.metrics if tuple(kappas) == (1, 5, 10) else evaluate(ev.result, gnd_list, protocol, kappas=tuple(kappas), n_database=n)

    known = {f.name for f in fields(RunConfig)}
    file_cfg = {k: v for k, v in desc.config.items() if k in known and k not in EVALUATION_FIELDS}
    base = None
    if "model" in file_cfg and "dataset" in file_cfg:
        try:
            base = RunConfig.from_dict(file_cfg)
        except (TypeError, ValueError):
            base = None
    foreign = base is None
    if foreign:
        base = RunConfig(model=(Path(desc.source).stem if desc.source else "descriptors").replace("+", "_"), dataset=dataset or "unknown")
    changes = {"whiten": whiten, "rerank": rerank, "topk": topk, "whiten_source": train_cfg.get("dataset") if train_cfg else None}
    cfg = base.replace(**{k: v for k, v in changes.items() if k in known})
    provenance = {k: v for k, v in desc.config.items() if k not in known and k not in ("format", "descriptor", "protocol", "retrbench_version")}
    if foreign:
        provenance.update(pooling=None, image_size=None)
    provenance.update(
        {
            "config_id": config_id(cfg),
            "rerank_label": pipeline_label(cfg.rerank),
            "features_file": desc.source or None,
            "extracted_with": desc.config.get("retrbench_version"),
            "ground_truth": reference,
            "whiten_features": train_src,
            "dim": int(ev.whitening["dim"]),
            "n_database": n,
            "n_queries": len(qnames),
            "ranking_length": int(ev.result.k),
            "whitening": ev.whitening,
            "rerank_notes": ev.rerank_notes,
            "retrbench_version": __version__,
        }
    )
    rows = tidy_rows(cfg, metrics, protocol=protocol, provenance=provenance)
    info = {**ev.timings, "whitening": ev.whitening, "features_file": desc.source, "features_config": desc.config}
    return RunResult(cfg, rows, info, ev.result, query_ids=tuple(qnames), database_ids=tuple(names), query_ap=ev.query_ap)
