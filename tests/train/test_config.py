"""InsCLRConfig: YAML round trip, normalisation of sequences, validation with named errors."""

from __future__ import annotations

from dataclasses import fields

import pytest

from retrbench.train.config import RUNTIME_FIELDS, InsCLRConfig

from .helpers import CFG


def test_config_roundtrips_through_yaml(tmp_path):
    cfg = CFG.replace(lr=(3e-4,), aug_scale=(0.5, 1.0), memory_size=7, trainable=r"^conv2\.")
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    assert InsCLRConfig.from_yaml(p) == cfg
    assert InsCLRConfig.from_dict(cfg.to_dict()) == cfg
    (tmp_path / "empty.yaml").write_text("")
    assert InsCLRConfig.from_yaml(tmp_path / "empty.yaml") == InsCLRConfig()
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        InsCLRConfig.from_yaml(tmp_path / "list.yaml")


def test_sequences_become_tuples_of_the_field_type():
    cfg = InsCLRConfig(stages=[4, 5], lr=1e-3, aug_ratio=[0.5, 2])
    assert cfg.stages == (4, 5) and cfg.lr == (1e-3,) and cfg.aug_ratio == (0.5, 2)
    assert all(isinstance(s, int) for s in InsCLRConfig(stages=(4.0,), lr=1e-3).stages)
    assert cfg.to_dict()["stages"] == [4, 5]  # YAML-friendly


def test_stage_lr_and_batch_images():
    assert CFG.replace(lr=(3e-4,)).stage_lr(1) == 3e-4
    assert (CFG.stage_lr(0), CFG.stage_lr(1)) == (1e-3, 5e-4)
    assert CFG.batch_images == 3 * (2 + 1)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"lr": (1e-3, 1e-4, 1e-5)}, "lr needs one value or one per stage"),
        ({"tuple_k": 10}, "tuple_k .* cannot exceed candidates_k"),
        ({"mining_score": "median"}, "mining_score must be one of"),
        ({"memory_init": "x"}, "memory_init must be one of"),
        ({"stages": ()}, "stages must be"),
        ({"stages": (3, -1)}, "stages must be"),
        ({"tuple_separation": 7}, "tuple_separation"),
        ({"image_size": 8}, "image_size"),
        ({"memory_size": 0}, "memory_size"),
        ({"aug_scale": (0.8, 0.5)}, "aug_scale"),
        ({"aug_ratio": (0.0, 1.0)}, "aug_ratio"),
        ({"checkpoint_every": 0}, "checkpoint_every"),
        ({"tuples_per_batch": 0}, "must be >= 1"),
    ],
)
def test_invalid_values_are_refused_with_the_field_named(bad, match):
    with pytest.raises(ValueError, match=match):
        CFG.replace(**bad)


def test_unknown_keys_and_bad_regex_are_refused():
    with pytest.raises(ValueError, match=r"unknown InsCLRConfig keys \['modle'\]"):
        InsCLRConfig.from_dict({"modle": "x"})
    with pytest.raises(Exception, match="unterminated|missing"):
        CFG.replace(trainable="(conv")


def test_runtime_fields_are_fields():
    assert set(RUNTIME_FIELDS) <= {f.name for f in fields(InsCLRConfig)}
