"""retrbench.utils.io: streamed sha256 of files and resumable, checksummed downloads.

(Moved from tests/backbones/test_weights.py with the functions they test.)"""

from __future__ import annotations

import hashlib
import http.server
from pathlib import Path

import pytest
import torch

from retrbench.utils.io import download, sha256_file


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    data = torch.randint(0, 256, (2_500_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    p = tmp_path / "blob.bin"
    p.write_bytes(bytes(data.tolist()))
    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()
    p.write_bytes(b"changed")  # the memo is keyed on size and mtime: a rewrite is hashed again
    assert sha256_file(p) == hashlib.sha256(b"changed").hexdigest()


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
