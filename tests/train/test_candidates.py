"""Step 1, candidate sets: faiss top-K against a numpy oracle, self exclusion, atomic cache, descriptors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from retrbench.extraction import FeatureCache
from retrbench.train.candidates import CandidateSets, candidate_sets, describe, load_or_compute
from retrbench.utils.images import ImageSpec, load_image


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clusters(rng: np.random.Generator, n_clusters: int, per: int, dim: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised points around ``n_clusters`` random centres; returns (points, cluster label)."""
    centres = rng.normal(size=(n_clusters, dim))
    labels = np.repeat(np.arange(n_clusters), per)
    return unit_rows(centres[labels] + noise * rng.normal(size=(len(labels), dim))), labels


def oracle(x: np.ndarray, k: int) -> np.ndarray:
    s = x.astype(np.float64) @ x.T.astype(np.float64)
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_matches_numpy_oracle_and_excludes_self(rng):
    x = unit_rows(rng.normal(size=(60, 8)))
    c = candidate_sets(x, 7)
    assert c.indices.shape == c.scores.shape == (60, 7) and c.k == 7 and len(c) == 60
    np.testing.assert_array_equal(c.indices, oracle(x, 7))
    assert not (c.indices == np.arange(60)[:, None]).any()
    assert (np.diff(c.scores, axis=1) <= 1e-6).all()  # best first
    np.testing.assert_allclose(c.scores, np.take_along_axis(x @ x.T, c.indices, 1), rtol=1e-5, atol=1e-5)


def test_identical_descriptors_never_list_the_image_itself(rng):
    v = unit_rows(rng.normal(size=(1, 4)))
    x = np.vstack([v, v, v, unit_rows(rng.normal(size=(2, 4)))])  # images 0, 1, 2 are identical
    c = candidate_sets(x, 4)
    for i in range(5):
        assert i not in c.of(i) and len(set(c.of(i))) == 4
    assert set(c.of(2)[:2]) == {0, 1}


def test_k_is_capped_and_validated(rng):
    x = unit_rows(rng.normal(size=(4, 3)))
    assert candidate_sets(x, 50).k == 3
    with pytest.raises(ValueError, match="k must be"):
        candidate_sets(x, 0)
    with pytest.raises(ValueError, match="at least 2"):
        candidate_sets(x[:1], 1)


def test_clean_clusters_give_pure_candidate_sets(rng):
    x, lab = clusters(rng, 6, 10, 16, noise=0.1)
    c = candidate_sets(x, 9)
    assert (lab[c.indices] == lab[:, None]).all()


def test_save_load_roundtrip_is_atomic(tmp_path, rng):
    c = candidate_sets(unit_rows(rng.normal(size=(10, 3))), 4)
    p = c.save(tmp_path / "sub" / "c.npz")
    back = CandidateSets.load(p)
    np.testing.assert_array_equal(back.indices, c.indices)
    np.testing.assert_array_equal(back.scores, c.scores)
    assert sorted(q.name for q in p.parent.iterdir()) == ["c.npz"]  # no temporary left behind


def test_load_or_compute_computes_once_and_recovers_from_damage(tmp_path, rng):
    x = unit_rows(rng.normal(size=(12, 3)))
    calls = []

    def compute() -> CandidateSets:
        calls.append(1)
        return candidate_sets(x, 3)

    p = tmp_path / "c.npz"
    first = load_or_compute(p, compute, n=12)
    second = load_or_compute(p, compute, n=12)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.indices, second.indices)
    load_or_compute(p, compute, n=13)  # another collection size: recomputed
    assert len(calls) == 2
    p.write_bytes(b"not an npz")  # a damaged file (e.g. a disk that filled up) is recomputed
    load_or_compute(p, compute, n=12)
    assert len(calls) == 3 and CandidateSets.load(p).k == 3


class _MeanColour(nn.Module):
    """A 'network' whose 3-channel map is the input itself (counts its calls)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _MeanColour.calls += 1
        return x + 2.0  # positive, so GeM sees what it pools


def test_describe_is_l2_gem_of_the_resized_image_and_cached(tmp_path):
    paths = []
    for i, (w, h) in enumerate([(40, 30), (30, 40), (40, 30)]):
        arr = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(arr).save(paths[-1])
    cache = FeatureCache(tmp_path / "cache", "k", {"x": 1})
    net = _MeanColour()
    d = describe(net, paths, 20, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), cache=cache, device="cpu", workers=0)
    assert d.shape == (3, 3)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1, rtol=1e-5)
    x = (load_image(ImageSpec(paths[1], None, 20)).float() / 255 - 0.5) / 0.5 + 2.0
    ref = x.clamp(min=1e-6).pow(3).mean(dim=(1, 2)).pow(1 / 3)
    np.testing.assert_allclose(d[1], (ref / ref.norm()).numpy(), rtol=1e-5)
    before = _MeanColour.calls
    again = describe(net, paths, 20, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), cache=cache, device="cpu", workers=0)
    assert _MeanColour.calls == before  # served from the cache
    np.testing.assert_array_equal(again, d)
    assert Path(cache.path).is_file()
