"""retrbench.datasets.groundtruth: the allow-listed unpickler, id ranges, text ground truth."""

from __future__ import annotations

import os
import pathlib
import pickle
from pathlib import Path

import pytest

from retrbench.datasets.groundtruth import UnsafePickleError, load_gnd_pickle, read_text_file, safe_load_pickle


class _Touch:
    """Unpickles as ``pathlib.Path.touch(marker)``: would create ``marker`` if it were run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class _Shell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _gnd(**entry: object) -> dict:
    return {"imlist": ["a", "b", "c"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [1], "junk": [], **entry}]}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
@pytest.mark.parametrize("payload", [_Touch, _Shell])
def test_malicious_gnd_pickle_is_refused_and_not_run(tmp_path: Path, protocol: int, payload: type) -> None:
    marker = tmp_path / "MARKER"
    p = tmp_path / "gnd_evil.pkl"
    p.write_bytes(pickle.dumps(_gnd(bbx=payload(marker)), protocol=protocol))
    with pytest.raises(UnsafePickleError) as err:
        load_gnd_pickle(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: refused to unpickle ") and "\n" not in msg
    assert ("getattr" in msg or "pathlib.Path" in msg) if payload is _Touch else "system" in msg
    assert "nothing from the file was run" in msg
    assert not marker.exists()


def test_refused_global_name_stays_on_one_line(tmp_path: Path) -> None:
    p = tmp_path / "odd.pkl"
    p.write_bytes(b"\x80\x04\x8c\x03a\nb\x8c\x01c\x93.")  # STACK_GLOBAL of module "a\nb", name "c"
    with pytest.raises(UnsafePickleError) as err:
        safe_load_pickle(p)
    assert "\n" not in str(err.value) and "a\\nb.c" in str(err.value)


def test_not_a_pickle_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "gnd.pkl"
    p.write_bytes(b"\x80\x04\x95")
    with pytest.raises(ValueError, match=r"gnd\.pkl: not a readable pickle") as err:
        load_gnd_pickle(p)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("key", "value"), [("junk", [2, 3]), ("hard", [-1]), ("easy", [7.0])])
def test_ids_beyond_imlist_name_query_key_and_value(tmp_path: Path, key: str, value: list) -> None:
    # before: read without complaint, and the id counted as a positive no ranking can list
    data = _gnd()
    data["gnd"].append({"easy": [], "hard": [], "junk": [], key: value})
    data["qimlist"].append("q2")
    p = tmp_path / "gnd_x.pkl"
    p.write_bytes(pickle.dumps(data))
    bad = next(v for v in value if not 0 <= v < 3)
    with pytest.raises(ValueError, match=rf"^{p}: gnd\[1\]\['{key}'\] has database id {int(bad)}, out of range: imlist has 3 images \(ids 0\.\.2\)$"):
        load_gnd_pickle(p)


def test_read_text_file(tmp_path: Path) -> None:
    p = tmp_path / "gt.txt"
    p.write_bytes(b"\xef\xbb\xbfq1 a\r\nq2 b\n")
    assert read_text_file(p) == "q1 a\r\nq2 b\n"
    p.write_bytes("line one\nline two \u00e9\n".encode("utf-8") + b"bad \xff here\n")
    with pytest.raises(ValueError, match=rf"^{p}: not UTF-8 text: byte 0xff at byte offset 25 \(line 3\): invalid start byte; save the list as UTF-8$"):
        read_text_file(p, what="list")
    with pytest.raises(FileNotFoundError, match="ground-truth file not found: .*nope.txt"):
        read_text_file(tmp_path / "nope.txt")
