"""retrbench.utils.checkpoint: safe reading (weights_only, allow-lists), state-dict extraction, clear errors."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from retrbench.utils.checkpoint import (
    NESTED_KEYS,
    NUMPY_GLOBALS,
    CheckpointError,
    read_checkpoint,
    read_state_dict,
    sklearn_pca_globals,
    strip_prefix,
    tensor_mapping,
    top_level,
)


class _Shell:
    """Pickles as a call to ``os.system``: what a malicious checkpoint would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture
def good_ckpt(tmp_path: Path) -> Path:
    p = tmp_path / "good.pth"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}, p)
    return p


# --------------------------------------------------------------------------- read_state_dict: flat files


def test_reads_flat_tensor_mapping(good_ckpt: Path) -> None:
    sd = read_state_dict(good_ckpt)
    assert list(sd) == ["w", "b"]
    assert torch.equal(sd["w"], torch.arange(6.0).reshape(2, 3))


def test_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="it is a directory"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(None, id="truncated-zip"),
        pytest.param(b"", id="empty"),
        pytest.param(b"hello, this is not a checkpoint\n" * 10, id="text"),
    ],
)
def test_truncated_or_foreign(tmp_path: Path, good_ckpt: Path, content: bytes | None) -> None:
    p = tmp_path / "broken.pth"
    p.write_bytes(good_ckpt.read_bytes()[: good_ckpt.stat().st_size // 2] if content is None else content)
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint") as err:
        read_state_dict(p)
    assert str(p) in str(err.value)


def test_refuses_arbitrary_globals(tmp_path: Path) -> None:
    p = tmp_path / "with_args.pth"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, p)
    with pytest.raises(CheckpointError, match="arbitrary unpickling") as err:
        read_state_dict(p)
    msg = str(err.value)
    assert "argparse.Namespace" in msg and str(p) in msg and "Nothing from the file was run" in msg
    assert "only tensors and plain containers are allowed" in msg


def test_wrong_structure_names_keys(tmp_path: Path) -> None:
    p = tmp_path / "wrapped.pth"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, p)
    with pytest.raises(CheckpointError) as err:
        read_state_dict(p)
    msg = str(err.value)
    assert "'model'" in msg and "'epoch'" in msg and "key=" in msg
    with pytest.raises(CheckpointError, match="expected the top-level key 'state_dict'.*'model'.*'epoch'"):
        read_state_dict(p, key="state_dict")
    assert list(read_state_dict(p, key="model")) == ["w"]


def test_not_a_mapping(tmp_path: Path) -> None:
    p = tmp_path / "list.pth"
    torch.save([torch.ones(1)], p)
    with pytest.raises(CheckpointError, match="found a list"):
        read_state_dict(p)
    with pytest.raises(CheckpointError, match="expected the top-level key 'state_dict'; found a list, not a mapping"):
        read_state_dict(p, key="state_dict")


# --------------------------------------------------------------------------- read_state_dict: nested layouts


@pytest.mark.parametrize("key", NESTED_KEYS)
def test_nested_and_module_prefix(tmp_path: Path, key: str) -> None:
    p = tmp_path / "train.pth.tar"
    torch.save({"epoch": 3, key: {"module.w": torch.ones(2), "module.b": torch.zeros(1)}}, p)
    assert list(read_state_dict(p, nested=NESTED_KEYS)) == ["module.w", "module.b"]
    sd = read_state_dict(p, nested=NESTED_KEYS, strip="module.")
    assert list(sd) == ["w", "b"] and torch.equal(sd["w"], torch.ones(2))


def test_nested_takes_the_first_listed_key(tmp_path: Path) -> None:
    p = tmp_path / "ema.pth"
    torch.save({"state_dict_ema": {"w": torch.full((1,), 2.0)}, "state_dict": {"w": torch.ones(1)}}, p)
    assert read_state_dict(p, nested=NESTED_KEYS)["w"].item() == 1.0
    assert read_state_dict(p, nested=("state_dict_ema",))["w"].item() == 2.0


def test_prefix_stripped_only_when_every_key_has_it(tmp_path: Path) -> None:
    p = tmp_path / "mixed.pth"
    torch.save({"module.w": torch.ones(1), "b": torch.ones(1)}, p)
    assert list(read_state_dict(p, strip="module.")) == ["module.w", "b"]


def test_nested_nothing_found(tmp_path: Path) -> None:
    p = tmp_path / "odd.pth"
    torch.save({"epoch": 1, "weights": [1, 2]}, p)
    with pytest.raises(CheckpointError, match=r"no state dict found: .*\['state_dict', 'model'.*found keys 'epoch'"):
        read_state_dict(p, nested=NESTED_KEYS)


def test_safetensors(tmp_path: Path) -> None:
    p = tmp_path / "w.safetensors"
    save_file({"module.w": torch.arange(3.0)}, str(p))
    sd = read_state_dict(p, strip="module.")
    assert list(sd) == ["w"] and torch.equal(sd["w"], torch.arange(3.0))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_state_dict(cut)


# --------------------------------------------------------------------------- allow-lists


def test_numpy_needs_the_allow_list(tmp_path: Path) -> None:
    p = tmp_path / "lw.pth"
    torch.save({"meta": {"P": np.eye(3), "m": np.float32(0.5)}, "state_dict": {}}, p)
    with pytest.raises(CheckpointError, match="would import or call numpy"):
        read_checkpoint(p, fmt="cirtorch")
    obj = read_checkpoint(p, allow=NUMPY_GLOBALS, fmt="cirtorch")
    np.testing.assert_array_equal(obj["meta"]["P"], np.eye(3))
    assert obj["meta"]["m"] == np.float32(0.5)
    # leaving the reader removes what it allowed: the next plain read refuses numpy again
    with pytest.raises(CheckpointError):
        read_checkpoint(p)


def test_allow_list_does_not_let_code_through(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.pth"
    torch.save({"meta": {"P": np.eye(2), "x": _Shell(f"touch {marker}")}}, p)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(p, allow=NUMPY_GLOBALS, fmt="cirtorch")
    msg = str(err.value)
    assert "system" in msg and "not on the allow-list for cirtorch checkpoints" in msg
    assert "allowed beyond tensors and plain containers: numpy" in msg
    assert not marker.exists()


def test_sklearn_pca_globals_names_the_legacy_module() -> None:
    from sklearn.decomposition import PCA

    allow = sklearn_pca_globals()
    assert PCA in allow and (PCA, "sklearn.decomposition.pca.PCA") in allow
    assert all(g in allow for g in NUMPY_GLOBALS)


# --------------------------------------------------------------------------- structure checks


def test_structure_helpers() -> None:
    sd = {"module.a": torch.ones(1), "module.b": torch.zeros(1)}
    assert list(strip_prefix(sd)) == ["a", "b"]
    assert tensor_mapping(sd, "f.pth", "here") == sd
    with pytest.raises(CheckpointError, match=r"f\.pth: expected a flat mapping .* here; .*1 are not str -> tensor \('n'\)"):
        tensor_mapping({**sd, "n": 3}, "f.pth", "here")
    assert top_level({"meta": 1, "state_dict": 2}, "f.pth", ("meta",), "cirtorch", "{'meta'}") == {"meta": 1, "state_dict": 2}
    with pytest.raises(CheckpointError, match=r"not a cirtorch checkpoint: expected \{'meta'\}; found keys 'x'"):
        top_level({"x": 1}, "f.pth", ("meta",), "cirtorch", "{'meta'}")
