import pytest

from retrbench.config import RunConfig, stable_hash


def test_roundtrip_and_unknown_keys():
    cfg = RunConfig(model="random", whiten=None, pooling="rmac")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown RunConfig keys \\['modle'\\]"):
        RunConfig.from_dict({"modle": "x"})


def test_frozen_and_validated():
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.model = "x"  # type: ignore[misc]
    with pytest.raises(ValueError, match="query_resize"):
        RunConfig(query_resize="stretch")
    with pytest.raises(ValueError, match="whiten"):
        RunConfig(whiten=0)


def test_stable_hash_order_independent():
    assert stable_hash({"a": 1, "b": 2}) == stable_hash({"b": 2, "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
