"""Search stage: exact inner-product nearest neighbours of the queries in the database.

On L2-normalised descriptors the inner product is the cosine similarity. The kernel (faiss's
brute-force inner product, GPU when available) lives in :mod:`retrbench.utils.linalg`, shared
with the rerankers' k-NN graphs; this module is the stage's public face.
"""

from __future__ import annotations

from .utils.linalg import exact_knn as knn
from .utils.linalg import exact_search as search

__all__ = ["search", "knn"]
