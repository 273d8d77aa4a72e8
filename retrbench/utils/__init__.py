"""Shared helpers under every stage: atomic file IO, hashing and downloads (``io``), data and
cache locations (``paths``), row-vector linear algebra and exact k-NN (``linalg``), image
decoding (``images``), devices (``device``) and safe checkpoint reading (``checkpoint``).

Nothing here imports a pipeline stage; every stage may import from here.
"""
