import pytest

from retrbench.config import RunConfig, config_id, stable_hash
from retrbench.specs import ModelRef, Step


def test_roundtrip_and_unknown_keys():
    cfg = RunConfig(model="random", whiten=None, pooling="rmac")
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"RunConfig: unknown key\(s\) 'modle' \(did you mean 'model'\?\)"):
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


def test_specs_are_parsed_once_into_typed_values():
    cfg = RunConfig(model=" simclr2x + simclr4x ", weights="a.pth+b.pth", pooling="GeM:p=4", rerank="g+dba+aqe:k=5")
    assert cfg.pooling == Step("gem", (("p", 4),))
    assert cfg.rerank.names == ("dba", "aqe") and cfg.rerank.steps[1].kwargs == {"k": 5}
    assert cfg.model == "simclr2x+simclr4x"
    assert cfg.models == (ModelRef("simclr2x", "a.pth"), ModelRef("simclr4x", "b.pth"))
    d = cfg.to_dict()
    assert (d["pooling"], d["rerank"]) == ("gem:p=4", "dba+aqe:k=5")
    assert RunConfig.from_dict(d) == cfg
    # the same run written two ways has one identity
    assert config_id(RunConfig(pooling="gem:p=4")) == config_id(RunConfig(pooling="gem(p=4)"))
    assert config_id(RunConfig(rerank="none")) == config_id(RunConfig(rerank="g"))


def test_bad_specs_fail_at_construction():
    with pytest.raises(ValueError, match="pooling spec 'gem:p'"):
        RunConfig(pooling="gem:p")
    with pytest.raises(ValueError, match=r"rerank spec 'dba\+\+aqe': empty step"):
        RunConfig(rerank="dba++aqe")
    with pytest.raises(ValueError, match="has 2 models but weights"):
        RunConfig(model="a+b", weights="one.pth")


def test_pixel_limit_default_is_the_image_decoders():
    from retrbench.config import DEFAULT_MAX_PIXELS
    from retrbench.utils import images

    assert RunConfig().max_pixels == DEFAULT_MAX_PIXELS == images.DEFAULT_MAX_PIXELS
    assert RunConfig(max_pixels=0).max_pixels == 0
    with pytest.raises(ValueError, match="max_pixels must be a number of pixels >= 0"):
        RunConfig(max_pixels=-1)
