"""Descriptor post-processing: L2 normalisation and PCA-whitening.

The literature's chain is L2 -> PCA-whiten -> L2 (Jegou & Chum 2012; cirtorch's
``pcawhitenlearn`` / ``whitenapply``): :func:`postprocess` does all three; a
:class:`PCAWhitening` on its own expects L2-normalised input (the first L2 is the caller's
job) and L2-normalises its output.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError

from .types import as_rows
from .utils.linalg import l2_normalize

__all__ = ["l2_normalize", "PCAWhitening", "WhiteningMemo", "postprocess"]

# Rows transformed per block, to bound the temporaries of (X - mean) @ P at database scale.
_BLOCK_ROWS = 16384


def _dimension_note(dim: int | None, keep: int, n: int, d: int, rank: int, eps: float) -> tuple[bool, str]:
    """``(capped, note)``: whether ``dim`` exceeded the available components and why fewer than
    requested (or than ``d``) are kept; ``rank`` counts components above ``eps`` x the largest."""
    available = min(n - 1, d, rank)
    reasons = []
    if available == d:
        reasons.append(f"the descriptors are {d}-dimensional")
    else:
        if n - 1 < d:
            reasons.append(f"{n} centred training vectors span at most n - 1 = {n - 1} dimensions")
        if rank < min(n - 1, d):
            reasons.append(f"only {rank} components have variance above {eps:g} x the largest")
    capped = dim is not None and int(dim) > available
    if capped:
        return True, f"whitening dim {dim} capped to {keep}: " + "; ".join(reasons)
    if dim is None and keep < d:
        return False, f"whitening keeps {keep} of {d} dims: " + "; ".join(reasons)
    return False, ""


class PCAWhitening:
    """PCA-whitening learned on a set of descriptors, scikit-learn estimator style.

    ``transform(X) = l2_normalize((X - mean_) @ projection_)``; before the final L2 the
    training set has zero mean and identity covariance (``ddof=1``; cirtorch's ``/ N``
    covariance differs by a global factor that the final L2 removes).

    Dimension cap: ``n`` centred training vectors span at most ``n - 1`` directions, so at
    most ``min(n - 1, D)`` components exist; components whose variance is at most
    ``eps`` times the largest are numerically zero (whitening would blow rounding noise up)
    and are dropped too. A requested ``dim`` above what is available is capped, with
    ``capped_ = True`` and an explanation in ``note_``.

    Args:
        dim: output dimension; None keeps every available component.
        eps: relative variance below which a component counts as absent.

    Attributes (after ``fit``):
        mean_: ``(D,)`` float64 training mean.
        projection_: ``(D, d')`` float64, principal directions scaled by ``1 / sqrt(variance)``.
        explained_variance_: ``(d',)`` variances of the kept components, largest first.
        n_components_: ``d'``.
        n_samples_, n_features_in_: training set size ``n`` and dimension ``D``.
        capped_: whether ``dim`` was reduced to what the training set allows.
        note_: why fewer components than requested (or than ``D``) were kept, else ``""``.
    """

    def __init__(self, dim: int | None = None, eps: float = 1e-10) -> None:
        self.dim = dim
        self.eps = eps

    def fit(self, X: np.ndarray) -> PCAWhitening:
        """Learn mean and whitening projection from the rows of ``X`` ``(n, D)``; returns self."""
        arr = np.asarray(X)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"PCAWhitening: expected a 2-D floating (n, D) training set, got {arr.dtype} {arr.shape}")
        x = arr.astype(np.float64)  # float64 for the covariance / SVD
        n, d = x.shape
        if self.dim is not None and (isinstance(self.dim, bool) or int(self.dim) != self.dim or self.dim < 1):
            raise ValueError(f"PCAWhitening: dim must be a positive integer or None, got {self.dim!r}")
        if n < 2:
            raise ValueError(f"PCAWhitening: need at least 2 training vectors to learn a whitening, got {n}")
        if not np.isfinite(x).all():
            raise ValueError("PCAWhitening: the training set contains NaN or infinite values")
        if np.ptp(x, axis=0).max() == 0:
            raise ValueError(f"PCAWhitening: the {n} training vectors are all identical (no variance)")
        # covariance_eigh (D x D covariance, then eigh) is exact and fastest when n >= D.
        solver = "covariance_eigh" if n >= d else "full"
        pca = PCA(n_components=min(n, d), whiten=True, svd_solver=solver).fit(x)
        var = np.asarray(pca.explained_variance_, dtype=np.float64)
        if var.size == 0 or var[0] <= 0:
            raise ValueError(f"PCAWhitening: the {n} training vectors are all identical (no variance)")
        rank = int(np.count_nonzero(var > self.eps * var[0]))
        available = min(n - 1, d, rank)
        keep = available if self.dim is None else min(int(self.dim), available)

        self.capped_, self.note_ = _dimension_note(self.dim, keep, n, d, rank, self.eps)

        self.mean_ = np.asarray(pca.mean_, dtype=np.float64)
        self.explained_variance_ = var[:keep].copy()
        self.projection_ = np.asarray(pca.components_[:keep], dtype=np.float64).T / np.sqrt(self.explained_variance_)
        self.n_components_ = keep
        self.n_samples_ = n
        self.n_features_in_ = d
        self.rank_ = rank
        return self

    def truncate(self, dim: int) -> PCAWhitening:
        """The whitening ``PCAWhitening(dim).fit(X)`` would give, from this one fitted on the
        same ``X`` with more components (components are nested: no new eigendecomposition).

        ``dim`` above the components kept here is capped, with the same ``capped_`` / ``note_``
        as ``fit`` gives. Sweeps fit once with ``dim=None`` and truncate for each dimension.
        """
        if not hasattr(self, "projection_"):
            raise NotFittedError("PCAWhitening is not fitted yet; call fit(X) first")
        if isinstance(dim, bool) or int(dim) != dim or dim < 1:
            raise ValueError(f"PCAWhitening.truncate: dim must be a positive integer, got {dim!r}")
        keep = min(int(dim), self.n_components_)
        available = min(self.n_samples_ - 1, self.n_features_in_, self.rank_)
        if int(dim) > self.n_components_ and self.n_components_ < available:
            raise ValueError(f"PCAWhitening.truncate: fitted with dim={self.dim}, cannot give {dim} components")
        out = PCAWhitening(dim=dim, eps=self.eps)
        out.mean_ = self.mean_
        out.explained_variance_ = self.explained_variance_[:keep]
        out.projection_ = self.projection_[:, :keep]
        out.n_components_ = keep
        out.n_samples_ = self.n_samples_
        out.n_features_in_ = self.n_features_in_
        out.rank_ = self.rank_
        out.capped_, out.note_ = _dimension_note(dim, keep, self.n_samples_, self.n_features_in_, self.rank_, self.eps)
        return out

    def transform(self, X: np.ndarray, normalize: bool = True) -> np.ndarray:
        """Whiten the rows of ``X``: ``(N, D) -> (N, d')`` float32, L2-normalised unless ``normalize=False``.

        Pure: the estimator is not modified.
        """
        if not hasattr(self, "projection_"):
            raise NotFittedError("PCAWhitening is not fitted yet; call fit(X) first")
        x = as_rows(X, "descriptors to whiten")
        if x.shape[1] != self.n_features_in_:
            raise ValueError(f"PCAWhitening: fitted on {self.n_features_in_}-d vectors, got shape {x.shape}")
        proj = self.projection_.astype(np.float32)
        mean = self.mean_.astype(np.float32)
        out = np.empty((x.shape[0], self.n_components_), dtype=np.float32)
        for s in range(0, x.shape[0], _BLOCK_ROWS):
            out[s : s + _BLOCK_ROWS] = (x[s : s + _BLOCK_ROWS] - mean) @ proj
        return l2_normalize(out) if normalize else out

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        """``fit(X).transform(X)``."""
        return self.fit(X).transform(X)

    def __repr__(self) -> str:
        return f"PCAWhitening(dim={self.dim!r}, eps={self.eps!r})"


def postprocess(
    db: np.ndarray,
    queries: np.ndarray,
    whiten: int | None,
    train: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """L2 -> (PCA-whiten -> L2) of database and query descriptors.

    Args:
        db: ``(N, D)`` database descriptors.
        queries: ``(Q, D)`` query descriptors.
        whiten: whitening output dimension; None keeps the L2-normalised descriptors
            (their true dimension ``D``).
        train: ``(n, D)`` descriptors to learn the whitening on (L2-normalised here like the
            others); None learns it on the L2-normalised database.

    Returns:
        ``(db', queries', info)``: ``(N, d)`` and ``(Q, d)`` float32 unit rows, and ``info``
        with ``requested_dim`` (``whiten``), ``dim`` (``d``, the dimension used), ``capped``
        (bool), ``note`` (why ``d`` is smaller than requested, else ``""``) and
        ``train_size`` (vectors the whitening was learned on, 0 without whitening).
    """
    d = l2_normalize(as_rows(db, "database descriptors"))
    q = l2_normalize(as_rows(queries, "query descriptors"))
    if d.shape[1] != q.shape[1]:
        raise ValueError(f"postprocess: database {d.shape} and queries {q.shape} have different dimensions")
    if whiten is None:
        info = {"requested_dim": None, "dim": d.shape[1], "capped": False, "note": "", "train_size": 0}
        return d, q, info
    t = d if train is None else l2_normalize(as_rows(train, "whitening training descriptors"))
    if t.shape[1] != d.shape[1]:
        raise ValueError(f"postprocess: whitening training set {t.shape} and database {d.shape} differ in dimension")
    pw = PCAWhitening(dim=whiten).fit(t)
    info = {
        "requested_dim": whiten,
        "dim": pw.n_components_,
        "capped": pw.capped_,
        "note": pw.note_,
        "train_size": pw.n_samples_,
    }
    return pw.transform(d), pw.transform(q), info


# ------------------------------------------------------------------------------ whitening memo



def _digest(a: np.ndarray) -> str:
    arr = np.ascontiguousarray(a)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


@dataclass
class _Fit:
    """A PCA-whitening fitted with every available component (``dim=None``)."""

    full: PCAWhitening
    train_size: int


class WhiteningMemo:
    """:func:`retrbench.whitening.postprocess` that fits the PCA once per training set.

    Same call and results as ``postprocess(db, queries, whiten, train)``. The full PCA of a
    training set (the L2-normalised database, or ``train``) is kept and truncated for each
    requested dimension; a repeated call with the same arrays (by content) and dimension
    returns the same (read-only) output arrays, so rerankers' database caches, keyed by array
    identity, are reused across rerank variants.

    Args:
        max_fits: fitted training sets kept (least recently used dropped).
        max_results: post-processed (database, queries) pairs kept.

    Attributes:
        fits: PCA fits computed; ``hits``: calls answered from memory.
    """

    def __init__(self, max_fits: int = 2, max_results: int = 4) -> None:
        self.max_fits = max_fits
        self.max_results = max_results
        self._fits: OrderedDict[str, _Fit] = OrderedDict()
        self._results: OrderedDict[tuple[Any, ...], tuple[np.ndarray, np.ndarray, dict[str, Any]]] = OrderedDict()
        self.fits = 0
        self.hits = 0

    def _remember(self, store: OrderedDict, key: Any, value: Any, limit: int) -> None:
        store[key] = value
        store.move_to_end(key)
        while len(store) > limit:
            store.popitem(last=False)

    def __call__(
        self,
        db: np.ndarray,
        queries: np.ndarray,
        whiten: int | None,
        train: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        kdb, kq = _digest(db), _digest(queries)
        ktrain = None if train is None else _digest(train)
        key = (kdb, kq, ktrain, whiten)
        if key in self._results:
            self.hits += 1
            self._results.move_to_end(key)
            d, q, info = self._results[key]
            return d, q, dict(info)
        if whiten is None:
            d, q, info = postprocess(db, queries, None)
        else:
            fkey = kdb if train is None else ktrain
            fkey = f"{'db' if train is None else 'train'}:{fkey}"
            if fkey not in self._fits:
                t = l2_normalize(np.asarray(db if train is None else train))
                self._remember(self._fits, fkey, _Fit(PCAWhitening(dim=None).fit(t), t.shape[0]), self.max_fits)
                self.fits += 1
            else:
                self._fits.move_to_end(fkey)
            fit = self._fits[fkey]
            d0, q0 = l2_normalize(np.asarray(db)), l2_normalize(np.asarray(queries))
            if d0.shape[1] != q0.shape[1] or d0.shape[1] != fit.full.n_features_in_:
                # let postprocess raise its own message
                return postprocess(db, queries, whiten, train)
            pw = fit.full.truncate(whiten)
            d, q = pw.transform(d0), pw.transform(q0)
            info = {"requested_dim": whiten, "dim": pw.n_components_, "capped": pw.capped_, "note": pw.note_, "train_size": fit.train_size}
        for a in (d, q):
            a.flags.writeable = False
        self._remember(self._results, key, (d, q, info), self.max_results)
        return d, q, dict(info)
