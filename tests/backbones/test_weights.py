"""retrbench.backbones.weights: resolving (explicit path, cache, download), published digest prefixes,
key remapping, strict loading."""

from __future__ import annotations

import hashlib
import http.server
from pathlib import Path

import pytest
import torch
from torch import nn

from retrbench.backbones.base import BackboneInfo
from retrbench.backbones.weights import (
    PUBLISHED_DIGEST_PREFIX,
    load_into,
    remap_state_dict,
    resolve_weights,
    strict_load,
    verify_published_digest,
)
from retrbench.utils.checkpoint import CheckpointError

PAYLOAD = bytes(range(256)) * 9000  # 2.3 MB: several 1 MiB read chunks
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


def _serve(srv: http.server.ThreadingHTTPServer, name: str, data: bytes) -> str:
    srv.files[f"/{name}"] = data  # type: ignore[attr-defined]
    return f"http://127.0.0.1:{srv.server_address[1]}/{name}"


@pytest.fixture
def good_ckpt(tmp_path: Path) -> Path:
    p = tmp_path / "good.pth"
    torch.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(2)}, p)
    return p


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


# --------------------------------------------------------------------------- resolve_weights


def _info(**kw: object) -> BackboneInfo:
    return BackboneInfo(channels=8, stride=4, mean=(0.5,) * 3, std=(0.5,) * 3, weights_file="w.pth", **kw)


def test_resolve_explicit_path(tmp_path: Path, good_ckpt: Path) -> None:
    assert resolve_weights(_info(), good_ckpt) == good_ckpt
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        resolve_weights(_info(), tmp_path / "missing.pth")
    # FILE#KEY is passed on to read_state_dict readers (keyed=True); the file part must exist
    assert resolve_weights(_info(), f"{good_ckpt}#state_dict", keyed=True) == Path(f"{good_ckpt}#state_dict")
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*missing\.pth#state_dict$"):
        resolve_weights(_info(), f"{tmp_path / 'missing.pth'}#state_dict", keyed=True)
    # entries that read a fixed layout refuse a key by name, before anything reads or hashes the file
    with pytest.raises(CheckpointError, match=r"#state_dict would pick a nested state dict, but Tiny weights are read whole.*--weights .*good"):
        resolve_weights(_info(label="Tiny"), f"{good_ckpt}#state_dict")


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


def test_resolve_alternatives_and_hint(tmp_path: Path) -> None:
    info = _info()
    (tmp_path / "old-name.pth").write_bytes(b"x")
    assert resolve_weights(info, None, cache_dir=tmp_path, alternatives=("w.pth", "old-name.pth")) == tmp_path / "old-name.pth"
    (tmp_path / "w.pth").write_bytes(b"x")
    assert resolve_weights(info, None, cache_dir=tmp_path, alternatives=("w.pth", "old-name.pth")) == tmp_path / "w.pth"
    with pytest.raises(FileNotFoundError, match=r"--weights PATH.*\n  Convert it first"):
        resolve_weights(info, None, cache_dir=tmp_path / "empty", how_to_get="Convert it first")


def test_resolve_default_cache_is_retrbench_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RETRBENCH_CACHE", str(tmp_path))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.pth").write_bytes(b"x")
    assert resolve_weights(_info(), None) == tmp_path / "weights" / "w.pth"


# --------------------------------------------------------------------------- digests and load_into


def test_verify_published_digest(tmp_path: Path) -> None:
    data = b"some weights"
    name = "resnet50-0676ba61.pth"
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(CheckpointError, match=rf"its sha256 is {hashlib.sha256(data).hexdigest()}, but .*0676ba61"):
        verify_published_digest(p)
    q = tmp_path / "my-own.pth"  # names not in the table are not checked
    q.write_bytes(data)
    verify_published_digest(q)
    assert all(algo in ("sha256", "md5") and len(prefix) == 8 for algo, prefix in PUBLISHED_DIGEST_PREFIX.values())


def test_load_into_fills_bn_counters_and_names_the_file() -> None:
    dst = _Tiny()
    sd = {k: v for k, v in _sd(_Tiny()).items() if not k.endswith("num_batches_tracked")}  # a pre-0.4.1 file
    load_into(dst, sd, "old.pth")
    assert dst.bn.num_batches_tracked.item() == 0 and torch.equal(dst.fc.weight, sd["fc.weight"])
    del sd["fc.bias"]
    with pytest.raises(CheckpointError, match=r"(?s)old\.pth: .*missing from the checkpoint \(1\): 'fc\.bias'\n  try this"):
        load_into(_Tiny(), sd, "old.pth", hint="try this")
