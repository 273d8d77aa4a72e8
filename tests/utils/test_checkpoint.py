"""retrbench.utils.checkpoint: safe reading (weights_only, allow-lists), state-dict extraction, clear errors."""

from __future__ import annotations

import argparse
import os
import pathlib
import pickle
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
    split_weights_key,
    strip_prefix,
    tensor_mapping,
    top_level,
    weights_digest,
)
from retrbench.utils.io import sha256_file


class _Shell:
    """Pickles as a call to ``os.system``: what a malicious checkpoint would hold."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Touch:
    """Pickles as ``pathlib.Path.touch(marker)``: creates ``marker`` if the file is ever run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


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
    assert "'model'" in msg and "'epoch'" in msg
    # the hint can be followed from the command line, and says how in Python
    assert '--weights FILE#KEY (weights="FILE#KEY" in Python)' in msg and f"--weights {p}#model" in msg
    assert "\n" not in msg
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


# --------------------------------------------------------------------------- malicious files: named, never "truncated"


def _save(kind: str, obj: object, p: Path) -> Path:
    if kind == "zip":
        torch.save(obj, p)
    elif kind == "zip-protocol-4":
        torch.save(obj, p, pickle_protocol=4)
    elif kind == "legacy":
        torch.save(obj, p, _use_new_zipfile_serialization=False)
    else:  # a bare pickle of the given protocol
        p.write_bytes(pickle.dumps(obj, protocol=int(kind.removeprefix("pickle-"))))
    return p


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["zip", "zip-protocol-4", "legacy", "pickle-0", "pickle-2", "pickle-4", "pickle-5"])
@pytest.mark.parametrize("payload", ["touch", "system"])
def test_malicious_checkpoint_names_the_refused_global(tmp_path: Path, kind: str, payload: str) -> None:
    # On the code before this change, protocol-4/5 files (FRAME opcode) were "truncated or not a
    # PyTorch checkpoint (Unsupported operand 149)", and Path.touch was named only as "getattr".
    marker = tmp_path / "MARKER"
    evil = _Touch(marker) if payload == "touch" else _Shell(f"touch {marker}")
    p = _save(kind, {"state_dict": {"w": torch.ones(2)}, "x": evil}, tmp_path / f"evil-{kind}.pth")
    for read in (read_checkpoint, read_state_dict):
        with pytest.raises(CheckpointError) as err:
            read(p)
        msg = str(err.value)
        assert "truncated" not in msg and "\n" not in msg
        assert msg.startswith(f"{p}: refused: reading it would import or call ")
        assert ("pathlib.Path" in msg) if payload == "touch" else ("system" in msg)
        assert "Nothing from the file was run" in msg
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_protocol_4_checkpoint_is_not_called_truncated(tmp_path: Path) -> None:
    p = _save("zip-protocol-4", {"w": torch.ones(2)}, tmp_path / "p4.pth")
    with pytest.raises(CheckpointError, match=r"opcode FRAME \(pickle protocol 4\).*Nothing from the file was run") as err:
        read_state_dict(p)
    assert "truncated" not in str(err.value)


# --------------------------------------------------------------------------- FILE#KEY


def test_file_hash_key_picks_a_nested_state_dict(tmp_path: Path) -> None:
    p = tmp_path / "train.pth"
    torch.save({"epoch": 3, "teacher": {"w": torch.full((2,), 2.0)}, "student": {"w": torch.ones(2)}}, p)
    assert split_weights_key(f"{p}#teacher") == (p, "teacher")
    assert read_state_dict(f"{p}#teacher")["w"].tolist() == [2.0, 2.0]
    assert read_state_dict(f"{p}#student", nested=NESTED_KEYS)["w"].tolist() == [1.0, 1.0]  # the key wins
    assert read_state_dict(f"{p}#teacher", key="teacher")["w"].tolist() == [2.0, 2.0]
    with pytest.raises(CheckpointError, match="#teacher in the path and key='student'"):
        read_state_dict(f"{p}#teacher", key="student")
    with pytest.raises(CheckpointError, match=r"expected the top-level key 'nope'; found keys 'epoch', 'teacher'"):
        read_state_dict(f"{p}#nope")
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*missing\.pth#teacher$"):
        read_state_dict(f"{tmp_path / 'missing.pth'}#teacher")
    assert split_weights_key(tmp_path / "dir#x" / "w.pth") == (tmp_path / "dir#x" / "w.pth", None)
    # the key is part of the weights' identity (two keys of one file are different weights)
    assert weights_digest(p) == sha256_file(p)
    assert weights_digest(f"{p}#teacher") == sha256_file(p) + "#teacher" != weights_digest(f"{p}#student")
    # readers of a fixed layout refuse a key by name
    with pytest.raises(CheckpointError, match=r"#KEY \('teacher'\).*MoCo checkpoints do not take"):
        read_checkpoint(f"{p}#teacher", fmt="MoCo")


def test_hash_in_an_existing_file_name_is_not_a_key(tmp_path: Path) -> None:
    p = tmp_path / "run#3.pth"
    torch.save({"w": torch.ones(2)}, p)
    assert split_weights_key(p) == (p, None)
    assert list(read_state_dict(p)) == ["w"] and list(read_checkpoint(p)) == ["w"]
    assert weights_digest(p) == sha256_file(p)
    nested = tmp_path / "a#b.pth"
    torch.save({"model": {"w": torch.ones(1)}}, nested)
    assert list(read_state_dict(f"{nested}#model")) == ["w"]  # the last '#' separates the key


def test_safetensors_has_no_keys(tmp_path: Path) -> None:
    p = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(3.0)}, str(p))
    with pytest.raises(CheckpointError, match="one flat mapping of tensors; it has no key 'state_dict'"):
        read_state_dict(f"{p}#state_dict")
