"""The contract for bad input and faults, end to end through ``retrbench`` (the CLI's ``main``).

Every case below gives a clear one-line message (the traceback only with ``-vv``), a documented
exit status (1: failed, 2: bad usage, 130: interrupted), and never a silent wrong number; what
was computed before a failure is kept. Unit tests of each piece live beside its module
(``tests/utils/test_images.py``, ``tests/test_extraction.py``, ``tests/evaluation``,
``tests/datasets``, ``tests/utils/test_checkpoint.py``, ``tests/test_faults.py``).

| input or fault | what happens |
| --- | --- |
| another folder with the same file names | its own descriptors (the cache key holds the resolved folder) |
| an image edited in place | extracted again (size and mtime of every image are checked) |
| weights that make NaN / inf descriptors | exit 1 naming the model and the first images; nothing cached |
| an image over the pixel limit (decompression bomb) | exit 1 naming the file, its size and ``--max-pixels`` |
| an undecodable image (in a worker process) | exit 1, one line naming the file, no worker traceback |
| 16-bit PNG, EXIF-rotated photo | decoded correctly; EXIF applied for ``folder:`` (``--exif/--no-exif``), recorded in rows |
| a cache folder that cannot be written | warning, the run continues without caching |
| a results folder that is a file or read-only | exit 1 before any extraction |
| ``--whiten 0``, unknown names, bad parameters | exit 2 before any work |
| ``aqe:k`` / ``dba:k`` / ``dfs:k`` above the database size | the clamp is noted in the rows and logged |
| a ranking row listing an id twice, ids out of range, ground-truth ids beyond the image list | exit 1 naming the row / query and the value |
| zero queries / no positives in a split | exit 0, a warning, ``null`` (valid JSON) in results.jsonl |
| a malicious ground-truth pickle or checkpoint | refused, naming the global it asked for; nothing executed |
| SIGKILL during extraction; Ctrl-C | rerun recomputes only unflushed batches, bitwise equal; Ctrl-C: one line, exit 130 |
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrbench.cli import main


def _photos(folder: Path, seed: int, n: int = 3) -> Path:
    """``n`` objects x 2 photos; each first photo queries its pair (groundtruth.csv)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    lines = ["query,positive"]
    for o in range(n):
        base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        for v in range(2):
            img = np.clip(base.astype(int) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"o{o}_v{v}.png")
        lines.append(f"o{o}_v0.png,o{o}_v1.png")
    (folder / "groundtruth.csv").write_text("\n".join(lines) + "\n")
    return folder


def _run(folder: Path, *extra: str, capsys=None) -> dict:
    args = ["run", "--model", "random", "--dataset", f"folder:{folder}", "--workers", "0", "--results-dir", "none", "--json", "-", *extra]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


def _map(payload: dict) -> float:
    return next(r["value"] for r in payload["rows"] if r["metric"] == "mAP")


def test_two_folders_with_the_same_names_never_share_descriptors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RETRBENCH_CACHE", str(tmp_path / "cache"))
    a = _run(_photos(tmp_path / "x" / "photos", seed=0), capsys=capsys)
    b = _run(_photos(tmp_path / "y" / "photos", seed=1), capsys=capsys)
    assert a["info"]["cache_hits"] == 0 and b["info"]["cache_hits"] == 0  # nothing reused from x/photos
    monkeypatch.setenv("RETRBENCH_CACHE", str(tmp_path / "fresh-cache"))
    assert _map(b) == _map(_run(tmp_path / "y" / "photos", capsys=capsys)) != _map(a)


def test_an_image_edited_in_place_is_extracted_again(tmp_path, monkeypatch):
    import retrbench as rb

    monkeypatch.setenv("RETRBENCH_CACHE", str(tmp_path / "cache"))
    folder = _photos(tmp_path / "photos", seed=0, n=6)
    kw = dict(model="random", dataset=f"folder:{folder}", workers=0, results_dir=None)
    before = rb.run(**kw).per_query.set_index("image")["AP"]
    assert rb.run(**kw).info["cache_hits"] == 2
    query = before[before < 100].index[0]  # a query whose positive is not ranked first
    positive = query.replace("_v0", "_v1")
    (folder / positive).write_bytes((folder / query).read_bytes())  # edited in place: now its twin
    after = rb.run(**kw).per_query.set_index("image")["AP"]
    assert after[query] == 100.0  # the new content was extracted, not the cached one
    monkeypatch.setenv("RETRBENCH_CACHE", str(tmp_path / "fresh-cache"))
    assert after.equals(rb.run(**kw).per_query.set_index("image")["AP"])


def test_nan_weights_are_an_error_naming_model_and_images_and_nothing_is_cached(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RETRBENCH_CACHE", str(tmp_path / "cache"))
    import timm
    import torch

    folder = _photos(tmp_path / "photos", seed=0)
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    sd = net.state_dict()
    sd["conv1.weight"] = torch.full_like(sd["conv1.weight"], float("nan"))
    torch.save(sd, tmp_path / "nan.pth")
    args = ["run", "--model", "timm:resnet18", "--weights", str(tmp_path / "nan.pth"), "--dataset", f"folder:{folder}", "--image-size", "64", "--workers", "0", "--results-dir", "none"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "timm:resnet18" in err[0] and "non-finite descriptors" in err[0] and ".png" in err[0]
    assert not list((tmp_path / "cache").rglob("meta.json"))  # no descriptor set was committed


def _bomb_png(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares ``width x height`` (the pixel data is a few bytes)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_one_line_naming_the_limit(tmp_path, capsys):
    folder = _photos(tmp_path / "photos", seed=0)
    _bomb_png(folder / "o2_v1.png", 30000, 30000)
    assert main(["run", "--model", "random", "--dataset", f"folder:{folder}", "--workers", "0", "--results-dir", "none"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "o2_v1.png" in err[0] and "30000x30000" in err[0] and "--max-pixels" in err[0]


def test_an_undecodable_image_in_a_worker_is_one_line(tmp_path, capsys):
    folder = _photos(tmp_path / "photos", seed=0)
    (folder / "o1_v1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert main(["run", "--model", "random", "--dataset", f"folder:{folder}", "--workers", "1", "--results-dir", "none"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "o1_v1.png" in err[0] and "worker" not in err[0].lower()


def test_exif_orientation_is_applied_to_folders_and_recorded(tmp_path, capsys):
    folder = _photos(tmp_path / "photos", seed=0)
    on = _run(folder, capsys=capsys)
    off = _run(folder, "--no-exif", capsys=capsys)
    assert on["rows"][0]["exif_orientation"] is True and off["rows"][0]["exif_orientation"] is False
    assert on["rows"][0]["config_id"] != off["rows"][0]["config_id"]


def test_a_cache_that_cannot_be_written_only_warns(tmp_path, capsys, monkeypatch):
    folder = _photos(tmp_path / "photos", seed=0)
    blocked = tmp_path / "cache-is-a-file"
    blocked.write_text("x")
    monkeypatch.setenv("RETRBENCH_CACHE", str(blocked))
    with pytest.warns(UserWarning, match="extracting without caching"):
        payload = _run(folder, capsys=capsys)
    assert payload["info"]["cache_hits"] == 0 and payload["rows"]


def test_a_results_folder_that_is_a_file_fails_before_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RETRBENCH_CACHE", str(tmp_path / "cache"))
    folder = _photos(tmp_path / "photos", seed=0)
    (tmp_path / "res").write_text("x")
    assert main(["run", "--model", "random", "--dataset", f"folder:{folder}", "--workers", "0", "--results-dir", str(tmp_path / "res")]) == 1
    err = capsys.readouterr().err
    assert "is a file" in err and not (tmp_path / "cache").exists()  # nothing extracted


@pytest.mark.parametrize(
    "args, message",
    [
        (["--whiten", "0"], "--whiten dimension must be a positive integer"),
        (["--pooling", "gem:p=0"], "p must be a finite number > 0"),
        (["--rerank", "aqe:q=1"], "unknown parameter"),
        (["--model", "resnet5"], "did you mean 'resnet50'"),
        (["--max-pixels", "-5"], "max_pixels must be a number of pixels >= 0"),
    ],
)
def test_bad_usage_exits_2_before_any_work(args, message, tmp_path, capsys):
    folder = _photos(tmp_path / "photos", seed=0)
    with pytest.raises(SystemExit) as e:  # argparse's own errors exit 2 too
        code = main(["run", "--model", "random", "--dataset", f"folder:{folder}", "--results-dir", "none", *args])
        raise SystemExit(code)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_neighbour_counts_above_the_database_are_noted(tmp_path, capsys):
    folder = _photos(tmp_path / "photos", seed=0)
    payload = _run(folder, "--rerank", "dba:k=10", capsys=capsys)
    assert payload["rows"][0]["rerank_notes"] == ["dba: k=10 is more than the 2 other database vectors; 2 used"]


def _gnd(tmp_path: Path, n_images: int = 5, easy=(0,), hard=(1,)) -> Path:
    import pickle

    data = {
        "imlist": [f"im{i}" for i in range(n_images)],
        "qimlist": ["q0"],
        "gnd": [{"easy": list(easy), "hard": list(hard), "junk": [], "bbx": [0, 0, 1, 1]}],
    }
    path = tmp_path / "gnd.pkl"
    path.write_bytes(pickle.dumps(data))
    return path


@pytest.mark.parametrize(
    "row, message",
    [
        ([0, 0, 0, 1, 2], "ranks row 0 lists database id 0 3 times (positions 0, 1, 2)"),
        ([0, 1, 2, 3, 7], "ranks row 0 has id 7 (position 4) but the database has 5 images (ids 0..4)"),
    ],
)
def test_evaluate_refuses_duplicate_and_out_of_range_ids(row, message, tmp_path, capsys):
    np.save(tmp_path / "r.npy", np.array([row]))
    assert main(["evaluate", "--ranks", str(tmp_path / "r.npy"), "--gnd", str(_gnd(tmp_path))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_evaluate_refuses_ground_truth_ids_beyond_the_image_list(tmp_path, capsys):
    np.save(tmp_path / "r.npy", np.array([[0, 1, 2, 3, 4]]))
    assert main(["evaluate", "--ranks", str(tmp_path / "r.npy"), "--gnd", str(_gnd(tmp_path, hard=(9,)))]) == 1
    err = capsys.readouterr().err
    assert "gnd.pkl: gnd[0]['hard'] has database id 9, out of range: imlist has 5 images" in err


def test_no_positives_is_a_warning_and_null_in_strict_json(tmp_path, capsys):
    from retrbench.results import EmptyMetricWarning

    np.save(tmp_path / "r.npy", np.array([[0, 1, 2, 3, 4]]))
    out = tmp_path / "m.json"
    with pytest.warns(EmptyMetricWarning, match="easy"):
        assert main(["evaluate", "--ranks", str(tmp_path / "r.npy"), "--gnd", str(_gnd(tmp_path, easy=())), "--json", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text
    easy = [m for m in json.loads(text)["metrics"] if m["split"] == "easy" and m["metric"] == "mAP"]
    assert easy[0]["value"] is None


class _Touch:
    """Unpickling this would create the marker file (it must never happen)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_malicious_ground_truth_pickle_is_refused_and_never_executed(tmp_path, capsys):
    import pickle

    marker = tmp_path / "PWNED"
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Touch(marker)]}))
    np.save(tmp_path / "r.npy", np.zeros((1, 1), dtype=np.int64))
    assert main(["evaluate", "--ranks", str(tmp_path / "r.npy"), "--gnd", str(tmp_path / "evil.pkl")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evil.pkl" in err[0] and not marker.exists()


def test_a_malicious_checkpoint_names_the_refused_global(tmp_path, capsys):
    import torch

    marker = tmp_path / "PWNED"
    torch.save({"weight": _Touch(marker)}, tmp_path / "evil.pth")
    folder = _photos(tmp_path / "photos", seed=0)
    args = ["run", "--model", "timm:resnet18", "--weights", str(tmp_path / "evil.pth"), "--dataset", f"folder:{folder}", "--results-dir", "none"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "evil.pth" in err and "truncated" not in err and ("touch" in err or "Path" in err) and not marker.exists()


def test_nested_weights_are_reachable_from_the_cli(tmp_path, capsys):
    import torch

    from retrbench.backbones import BACKBONES

    sd = BACKBONES.create("efficientnet_lite0", pretrained=False).net.state_dict()
    torch.save({"epoch": 3, "model": sd}, tmp_path / "ckpt.pth")
    folder = _photos(tmp_path / "photos", seed=0)
    base = ["run", "--model", "efficientnet_lite0", "--dataset", f"folder:{folder}", "--image-size", "64", "--workers", "0", "--results-dir", "none"]
    assert main([*base, "--weights", str(tmp_path / "ckpt.pth")]) == 1
    assert "#KEY" in capsys.readouterr().err  # the hint says how
    assert main([*base, "--weights", f"{tmp_path / 'ckpt.pth'}#model"]) == 0
