"""retrbench.backbones.weights: checkpoint reading, key remapping, strict loading, resolving, downloading."""

from __future__ import annotations

import argparse
import hashlib
import http.server
from pathlib import Path

import pytest
import torch
from torch import nn

from retrbench.backbones.base import BackboneInfo
from retrbench.backbones.weights import (
    CheckpointError,
    default_cache_dir,
    download,
    load_state_dict,
    remap_state_dict,
    resolve_weights,
    sha256_file,
    strict_load,
)

# --------------------------------------------------------------------------- sha256


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    data = torch.randint(0, 256, (2_500_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    p = tmp_path / "blob.bin"
    p.write_bytes(bytes(data.tolist()))
    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    p.write_bytes(b"changed")  # the memo is keyed on size and mtime: a rewrite is hashed again
    assert sha256_file(p) == hashlib.sha256(b"changed").hexdigest()


# --------------------------------------------------------------------------- load_state_dict


@pytest.fixture
def good_ckpt(tmp_path: Path) -> Path:
    p = tmp_path / "good.pth"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}, p)
    return p


def test_load_state_dict_reads_flat_tensor_mapping(good_ckpt: Path) -> None:
    sd = load_state_dict(good_ckpt)
    assert list(sd) == ["w", "b"]
    assert torch.equal(sd["w"], torch.arange(6.0).reshape(2, 3))


def test_load_state_dict_missing_file_names_path(tmp_path: Path) -> None:
    p = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_state_dict(p)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(None, id="truncated-zip"),
        pytest.param(b"", id="empty"),
        pytest.param(b"hello, this is not a checkpoint\n" * 10, id="text"),
    ],
)
def test_load_state_dict_truncated_or_foreign(tmp_path: Path, good_ckpt: Path, content: bytes | None) -> None:
    p = tmp_path / "broken.pth"
    p.write_bytes(good_ckpt.read_bytes()[: good_ckpt.stat().st_size // 2] if content is None else content)
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint") as err:
        load_state_dict(p)
    assert str(p) in str(err.value)


def test_load_state_dict_refuses_arbitrary_globals(tmp_path: Path) -> None:
    p = tmp_path / "with_args.pth"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, p)
    with pytest.raises(CheckpointError, match="arbitrary unpickling") as err:
        load_state_dict(p)
    assert "argparse.Namespace" in str(err.value)
    assert str(p) in str(err.value)


def test_load_state_dict_wrong_structure_names_keys(tmp_path: Path) -> None:
    p = tmp_path / "wrapped.pth"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, p)
    with pytest.raises(CheckpointError) as err:
        load_state_dict(p)
    msg = str(err.value)
    assert "'model'" in msg and "'epoch'" in msg and "key=" in msg
    with pytest.raises(CheckpointError, match="expected the top-level key 'state_dict'.*'model'.*'epoch'"):
        load_state_dict(p, key="state_dict")
    assert list(load_state_dict(p, key="model")) == ["w"]


def test_load_state_dict_not_a_mapping(tmp_path: Path) -> None:
    p = tmp_path / "list.pth"
    torch.save([torch.ones(1)], p)
    with pytest.raises(CheckpointError, match="found a list"):
        load_state_dict(p)


# --------------------------------------------------------------------------- remap_state_dict


def test_remap_rules_apply_in_order() -> None:
    sd = {"module.fc.weight": torch.ones(1), "module.conv.weight": torch.zeros(1), "bn.bias": torch.ones(1)}
    out = remap_state_dict(sd, [(r"^module\.", ""), (r"^fc\.", "head."), (r"^head\.", "classifier.")])
    assert list(out) == ["classifier.weight", "conv.weight", "bn.bias"]
    assert out["classifier.weight"] is sd["module.fc.weight"]  # values are not copied
    assert remap_state_dict(sd, []) == sd


def test_remap_collision_raises() -> None:
    with pytest.raises(ValueError, match="both map to 'w'"):
        remap_state_dict({"a.w": torch.ones(1), "b.w": torch.ones(1)}, [(r"^\w+\.", "")])


# --------------------------------------------------------------------------- strict_load


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)


def _sd(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() + 1 for k, v in module.state_dict().items()}


def test_strict_load_exact_match_copies_values() -> None:
    src, dst = _Tiny(), _Tiny()
    sd = _sd(src)
    strict_load(dst, sd)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_strict_load_reports_missing_and_unexpected() -> None:
    sd = _sd(_Tiny())
    del sd["fc.weight"], sd["bn.running_mean"]
    sd["extra.weight"] = torch.ones(1)
    with pytest.raises(ValueError) as err:
        strict_load(_Tiny(), sd)
    msg = str(err.value)
    assert "2 missing" in msg and "1 unexpected" in msg
    assert "fc.weight" in msg and "bn.running_mean" in msg and "extra.weight" in msg


def test_strict_load_ignore_patterns() -> None:
    dst = _Tiny()
    before = dst.fc.weight.clone()
    sd = {k: v for k, v in _sd(_Tiny()).items() if not k.startswith("fc.")}
    sd["aux_head.weight"] = torch.ones(3)
    strict_load(dst, sd, ignore=(r"^fc\.", r"^aux_head\."))
    assert torch.equal(dst.fc.weight, before)  # ignored missing keys keep their values
    assert torch.equal(dst.conv.weight, sd["conv.weight"])


def test_strict_load_shape_mismatch_named() -> None:
    sd = _sd(_Tiny())
    sd["fc.weight"] = torch.ones(5, 4)
    with pytest.raises(ValueError, match=r"fc\.weight: checkpoint \(5, 4\) vs model \(2, 4\)"):
        strict_load(_Tiny(), sd)
    dst = _Tiny()
    strict_load(dst, sd, ignore=(r"^fc\.weight$",))  # e.g. a classifier with another class count
    assert dst.fc.weight.shape == (2, 4)


def test_strict_load_lists_first_ten_with_counts() -> None:
    sd = {f"junk{i}": torch.ones(1) for i in range(25)} | _sd(_Tiny())
    with pytest.raises(ValueError, match=r"unexpected in the checkpoint \(25\):.*\(15 more\)"):
        strict_load(_Tiny(), sd)


# --------------------------------------------------------------------------- download


def _serve(srv: http.server.ThreadingHTTPServer, name: str, data: bytes) -> str:
    srv.files[f"/{name}"] = data  # type: ignore[attr-defined]
    return f"http://127.0.0.1:{srv.server_address[1]}/{name}"


PAYLOAD = bytes(range(256)) * 9000  # 2.3 MB: several 1 MiB read chunks
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_download_verifies_checksum(server, tmp_path: Path) -> None:
    url = _serve(server, "w.pth", PAYLOAD)
    dest = tmp_path / "sub" / "w.pth"
    assert download(url, dest, sha256=PAYLOAD_SHA, progress=False) == dest
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "sub" / "w.pth.part").exists()


def test_download_resumes_part_file(server, tmp_path: Path) -> None:
    url = _serve(server, "w.pth", PAYLOAD)
    dest = tmp_path / "w.pth"
    half = len(PAYLOAD) // 2
    (tmp_path / "w.pth.part").write_bytes(PAYLOAD[:half])
    download(url, dest, sha256=PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD
    assert server.log == [("/w.pth", f"bytes={half}-")]
    assert not (tmp_path / "w.pth.part").exists()


def test_download_restarts_when_range_ignored(server, tmp_path: Path) -> None:
    _serve(server, "w.pth", PAYLOAD)
    url = f"http://127.0.0.1:{server.server_address[1]}/norange/w.pth"
    (tmp_path / "w.pth.part").write_bytes(PAYLOAD[:1000])
    download(url, tmp_path / "w.pth", sha256=PAYLOAD_SHA, progress=False)
    assert (tmp_path / "w.pth").read_bytes() == PAYLOAD


def test_download_complete_part_file_starts_over(server, tmp_path: Path) -> None:
    url = _serve(server, "w.pth", PAYLOAD)
    (tmp_path / "w.pth.part").write_bytes(PAYLOAD + b"extra")  # server answers 416 to the Range request
    download(url, tmp_path / "w.pth", sha256=PAYLOAD_SHA, progress=False)
    assert (tmp_path / "w.pth").read_bytes() == PAYLOAD
    assert [rng for _, rng in server.log] == [f"bytes={len(PAYLOAD) + 5}-", None]


def test_download_interrupted_keeps_part_then_resumes(server, tmp_path: Path) -> None:
    _serve(server, "w.pth", PAYLOAD)
    port = server.server_address[1]
    dest = tmp_path / "w.pth"
    with pytest.raises(OSError, match="kept to resume"):
        download(f"http://127.0.0.1:{port}/short/w.pth", dest, sha256=PAYLOAD_SHA, progress=False)
    part = tmp_path / "w.pth.part"
    assert not dest.exists() and 0 < part.stat().st_size < len(PAYLOAD)
    assert PAYLOAD.startswith(part.read_bytes())
    download(f"http://127.0.0.1:{port}/w.pth", dest, sha256=PAYLOAD_SHA, progress=False)
    assert dest.read_bytes() == PAYLOAD


def test_download_checksum_mismatch_leaves_nothing(server, tmp_path: Path) -> None:
    url = _serve(server, "w.pth", PAYLOAD)
    dest = tmp_path / "w.pth"
    wrong = "0" * 64
    with pytest.raises(ValueError) as err:
        download(url, dest, sha256=wrong, progress=False)
    assert wrong in str(err.value) and PAYLOAD_SHA in str(err.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- resolve_weights


def _info(**kw: object) -> BackboneInfo:
    return BackboneInfo(channels=8, stride=4, mean=(0.5,) * 3, std=(0.5,) * 3, weights_file="w.pth", **kw)


def test_resolve_explicit_path(tmp_path: Path, good_ckpt: Path) -> None:
    assert resolve_weights(_info(), good_ckpt) == good_ckpt
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        resolve_weights(_info(), tmp_path / "missing.pth")


def test_resolve_cache_then_error(tmp_path: Path) -> None:
    info = _info(weights_source="some paper")
    with pytest.raises(FileNotFoundError) as err:
        resolve_weights(info, None, cache_dir=tmp_path)
    assert str(tmp_path / "w.pth") in str(err.value) and "--weights" in str(err.value)
    (tmp_path / "w.pth").write_bytes(b"x")
    assert resolve_weights(info, None, cache_dir=tmp_path) == tmp_path / "w.pth"


def test_resolve_downloads_into_cache(server, tmp_path: Path) -> None:
    info = _info(url=_serve(server, "published.pth", PAYLOAD), sha256=PAYLOAD_SHA)
    path = resolve_weights(info, None, cache_dir=tmp_path)
    assert path == tmp_path / "w.pth" and path.read_bytes() == PAYLOAD
    assert resolve_weights(info, None, cache_dir=tmp_path) == path  # second call: cached, no request
    assert len(server.log) == 1


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RETRBENCH_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "weights"
    monkeypatch.delenv("RETRBENCH_CACHE")
    assert default_cache_dir() == Path(torch.hub.get_dir()) / "checkpoints"
