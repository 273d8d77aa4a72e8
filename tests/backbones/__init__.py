"""Tests of retrbench.backbones (a package, so that test module names such as test_registry do not clash with tests/test_registry.py)."""
