"""retrbench.datasets.demo.catalogue: the source photos, instances and distractors."""

from __future__ import annotations

import pytest

from retrbench.datasets.demo import catalogue


def test_sources_are_readable_and_documented() -> None:
    for src in catalogue.SOURCES:
        assert catalogue.source_path(src).is_file()
        assert src.licence and src.credit and len(src.sha256) == 64
    keys = {s.key for s in catalogue.SOURCES}
    assert len(keys) == len(catalogue.SOURCES)
    assert {i.source for i in catalogue.INSTANCES} <= keys
    assert {k for k, _, _ in catalogue.DISTRACTORS} <= keys


def test_regions_hold_their_boxes_and_never_overlap() -> None:
    def overlap(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    regions: list[tuple[str, tuple[int, ...]]] = []
    for inst in catalogue.INSTANCES:
        r, b = inst.region, inst.box
        assert r[0] <= b[0] < b[2] <= r[2] and r[1] <= b[1] < b[3] <= r[3], inst.name
        regions.append((inst.source, r))
    regions += [(k, r) for k, r, _ in catalogue.DISTRACTORS if r is not None]
    for i, (ka, ra) in enumerate(regions):
        for kb, rb in regions[i + 1 :]:
            assert not (ka == kb and overlap(ra, rb)), (ka, ra, rb)
    # a photo used whole as a distractor is no instance's photo
    assert not {k for k, r, _ in catalogue.DISTRACTORS if r is None} & {i.source for i in catalogue.INSTANCES}


def test_read_source_is_rgb_and_flags_a_different_file(monkeypatch: pytest.MonkeyPatch) -> None:
    src = next(s for s in catalogue.SOURCES if s.key == "astronaut")
    mismatched: list[str] = []
    img = catalogue.read_source(src, mismatched)
    assert img.mode == "RGB" and img.size == (512, 512) and mismatched == []
    other = catalogue.Source(src.key, src.package, src.path, src.licence, src.credit, "0" * 64)
    catalogue.read_source(other, mismatched)
    assert mismatched == [src.key]


def test_missing_package_or_file_is_named() -> None:
    with pytest.raises(FileNotFoundError, match="no_such_package_xyz"):
        catalogue.source_path(catalogue.Source("x", "no_such_package_xyz", "a.png", "", "", ""))
    with pytest.raises(FileNotFoundError, match="data/no_such_photo.png"):
        catalogue.source_path(catalogue.Source("x", "skimage", "data/no_such_photo.png", "", "", ""))
