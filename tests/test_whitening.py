"""Whitening: identity covariance, dimension capping, purity, and a numpy eigh reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from retrbench.whitening import PCAWhitening, l2_normalize, postprocess


def low_rank(rng: np.random.Generator, n: int, d: int, rank: int, noise: float = 0.05) -> np.ndarray:
    """``(n, d)`` float32 rows of intrinsic dimension ~``rank`` plus isotropic noise, off-centre."""
    x = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d)) + noise * rng.standard_normal((n, d))
    return (x + 3.0).astype(np.float32)


def test_l2_normalize(rng: np.random.Generator) -> None:
    x = rng.standard_normal((5, 4)).astype(np.float32)
    x[2] = 0.0
    before = x.copy()
    y = l2_normalize(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(np.linalg.norm(y[[0, 1, 3, 4]], axis=1), 1.0, rtol=1e-6)
    assert (y[2] == 0).all()  # zero rows stay zero
    np.testing.assert_array_equal(x, before)
    assert l2_normalize(x.astype(np.float64)).dtype == np.float64
    with pytest.raises(ValueError, match="2-D"):
        l2_normalize(np.ones(3))


def test_whitened_training_set_has_zero_mean_identity_covariance(rng: np.random.Generator) -> None:
    x = l2_normalize(low_rank(rng, 400, 24, rank=6))
    pw = PCAWhitening(dim=16).fit(x)
    assert pw.projection_.shape == (24, 16) and pw.n_components_ == 16 and not pw.capped_ and pw.note_ == ""
    z = pw.transform(x, normalize=False).astype(np.float64)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.eye(16), atol=2e-3)
    assert np.all(np.diff(pw.explained_variance_) <= 0)  # largest first
    out = pw.transform(x)
    assert out.dtype == np.float32 and out.shape == (400, 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)


def test_matches_numpy_eigh_up_to_sign(rng: np.random.Generator) -> None:
    x = low_rank(rng, 300, 12, rank=12, noise=0.2).astype(np.float64)
    pw = PCAWhitening(dim=8).fit(x)
    xc = x - x.mean(axis=0)
    val, vec = np.linalg.eigh(xc.T @ xc / (len(x) - 1))
    order = np.argsort(val)[::-1][:8]
    p_ref = vec[:, order] / np.sqrt(val[order])
    np.testing.assert_allclose(pw.mean_, x.mean(axis=0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(pw.explained_variance_, val[order], rtol=1e-8)
    signs = np.sign(np.sum(pw.projection_ * p_ref, axis=0))
    assert np.all(signs != 0)
    np.testing.assert_allclose(pw.projection_, p_ref * signs, rtol=1e-6, atol=1e-8)


def test_dimension_capped_by_training_size(rng: np.random.Generator) -> None:
    x = l2_normalize(rng.standard_normal((10, 16)).astype(np.float32))
    pw = PCAWhitening(dim=12).fit(x)
    assert pw.n_components_ == 9 and pw.capped_  # 10 centred vectors span 9 dimensions
    assert "capped to 9" in pw.note_ and "n - 1 = 9" in pw.note_
    assert pw.transform(x).shape == (10, 9)

    full = PCAWhitening(dim=None).fit(x)
    assert full.n_components_ == 9 and not full.capped_ and "keeps 9 of 16" in full.note_

    small = PCAWhitening(dim=4).fit(x)
    assert small.n_components_ == 4 and not small.capped_ and small.note_ == ""


def test_dimension_capped_by_descriptor_dim_and_rank(rng: np.random.Generator) -> None:
    x = rng.standard_normal((100, 8)).astype(np.float32)
    pw = PCAWhitening(dim=32).fit(x)
    assert pw.n_components_ == 8 and pw.capped_ and "8-dimensional" in pw.note_

    flat = rng.standard_normal((100, 5)) @ rng.standard_normal((5, 16))  # exactly rank 5
    pw = PCAWhitening(dim=10).fit(flat.astype(np.float32))
    assert pw.n_components_ == 5 and pw.capped_ and "only 5 components" in pw.note_
    assert np.isfinite(pw.projection_).all()


def test_transform_is_pure(rng: np.random.Generator) -> None:
    x = l2_normalize(low_rank(rng, 50, 10, rank=4))
    pw = PCAWhitening(dim=6).fit(x)
    state = {k: np.copy(v) for k, v in vars(pw).items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in vars(pw).items() if not isinstance(v, np.ndarray)}
    y = rng.standard_normal((7, 10)).astype(np.float32)
    y_before = y.copy()
    a = pw.transform(y)
    b = pw.transform(y)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(y, y_before)
    for k, v in state.items():
        np.testing.assert_array_equal(getattr(pw, k), v)
    assert {k: v for k, v in vars(pw).items() if not isinstance(v, np.ndarray)} == scalars


def test_errors(rng: np.random.Generator) -> None:
    with pytest.raises(NotFittedError):
        PCAWhitening().transform(np.ones((2, 3), np.float32))
    pw = PCAWhitening(dim=2).fit(rng.standard_normal((20, 4)))
    with pytest.raises(ValueError, match="fitted on 4-d"):
        pw.transform(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match="at least 2"):
        PCAWhitening().fit(np.ones((1, 4)))
    with pytest.raises(ValueError, match="identical"):
        PCAWhitening().fit(np.ones((5, 4)))
    with pytest.raises(ValueError, match="positive integer"):
        PCAWhitening(dim=0).fit(rng.standard_normal((5, 4)))


def test_postprocess_without_whitening(rng: np.random.Generator) -> None:
    db, q = rng.standard_normal((30, 8)), rng.standard_normal((4, 8))
    d2, q2, info = postprocess(db, q, whiten=None)
    np.testing.assert_allclose(d2, db / np.linalg.norm(db, axis=1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(q2, q / np.linalg.norm(q, axis=1, keepdims=True), rtol=1e-5)
    assert info == {"requested_dim": None, "dim": 8, "capped": False, "note": "", "train_size": 0}


def test_postprocess_whitening(rng: np.random.Generator) -> None:
    db, q = low_rank(rng, 60, 12, rank=5), low_rank(rng, 5, 12, rank=5)
    d2, q2, info = postprocess(db, q, whiten=6)
    assert d2.shape == (60, 6) and q2.shape == (5, 6) and d2.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(d2, axis=1), 1.0, rtol=1e-5)
    assert info == {"requested_dim": 6, "dim": 6, "capped": False, "note": "", "train_size": 60}
    # Same as L2 -> PCAWhitening fitted on the L2-normalised database.
    pw = PCAWhitening(dim=6).fit(l2_normalize(db))
    np.testing.assert_allclose(q2, pw.transform(l2_normalize(q)), atol=1e-6)

    train = low_rank(rng, 8, 12, rank=5)
    _, _, info = postprocess(db, q, whiten=6, train=train)
    assert info["train_size"] == 8 and info["dim"] == 6

    _, _, info = postprocess(db, q, whiten=6, train=train[:5])
    assert info["capped"] and info["dim"] == 4 and "capped to 4" in info["note"]

    with pytest.raises(ValueError, match="different dimensions"):
        postprocess(db, q[:, :5], whiten=None)
