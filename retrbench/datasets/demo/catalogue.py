"""Which photos the demo dataset is made of: the sources, the 14 instances and the distractors.

Every photo ships inside an installed package (scikit-image, scikit-learn, matplotlib) and is
read from there, never copied into this repository. :data:`SOURCES` lists each file with its
licence and credit (repeated in the built dataset's manifest); :data:`INSTANCES` are regions of
some of them with the object box inside; :data:`DISTRACTORS` are the other photos (or parts of
instance photos outside every instance region) shown only as negatives.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

__all__ = ["SOURCES", "INSTANCES", "DISTRACTORS", "Source", "Instance", "source_path", "read_source"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """A photo shipped inside an installed package.

    Attributes:
        key: short name used below.
        package: importable package holding the file.
        path: file path inside the package folder.
        licence: licence or status, as the package documents it.
        credit: author / origin, as the package documents it.
        sha256: the file as shipped in the versions this dataset was designed with (a different
            file is used anyway, with a warning, and recorded in the manifest).
    """

    key: str
    package: str
    path: str
    licence: str
    credit: str
    sha256: str


_SK = "skimage data docstring (skimage/data/_fetchers.py)"

# fmt: off
SOURCES: tuple[Source, ...] = (
    # key, package, path inside the package, licence, credit, sha256 of the file as designed with
    # -- instances
    Source("astronaut", "skimage", "data/astronaut.png", "public domain (no known copyright restrictions)", f"NASA, Eileen Collins; {_SK}", "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
    Source("chelsea", "skimage", "data/chelsea.png", "CC0", f"Stefan van der Walt; {_SK}", "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
    Source("coffee", "skimage", "data/coffee.png", "CC0", f"Rachel Michetti, courtesy of Pikolo Espresso Bar; {_SK}", "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
    Source("rocket", "skimage", "data/rocket.jpg", "public domain", f"SpaceX, DSCOVR launch on Falcon 9; {_SK}", "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"),
    Source("china", "sklearn", "datasets/images/china.jpg", "CC BY 2.0", "danielbuechele (flickr.com/photos/danielbuechele/6061409035); sklearn/datasets/images/README.txt", "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29"),
    Source("flower", "sklearn", "datasets/images/flower.jpg", "CC BY 2.0", "vultilion (flickr.com/photos/vultilion/6056698931); sklearn/datasets/images/README.txt", "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638"),
    Source("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "public domain (official U.S. Navy photograph, work of the U.S. federal government; matplotlib ships no note)", "U.S. Navy, Commodore Grace M. Hopper (Naval History and Heritage Command NH 96919-KN)", "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130"),
    Source("retina", "skimage", "data/retina.jpg", "CC0", f"Mikael Haggstrom, Wikimedia Commons; {_SK}", "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6"),
    Source("ihc", "skimage", "data/ihc.png", "no known copyright restrictions", f"Center for Microscopy and Molecular Imaging (CMMI); {_SK}", "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef"),
    Source("hubble", "skimage", "data/hubble_deep_field.jpg", "public domain", f"NASA, HubbleSite 2012-37; {_SK}", "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4"),
    # -- distractors
    Source("camera", "skimage", "data/camera.png", "CC0", f"Lav Varshney; {_SK}", "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a"),
    Source("coins", "skimage", "data/coins.png", "no known copyright restrictions", f"Brooklyn Museum Collection; {_SK}", "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba"),
    Source("clock", "skimage", "data/clock_motion.png", "public domain", f"Stefan van der Walt; {_SK}", "f029226b28b642e80113d86622e9b215ee067a0966feaf5e60604a1e05733955"),
    Source("brick", "skimage", "data/brick.png", "CC0", f"CC0Textures Bricks25; {_SK}", "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf"),
    Source("grass", "skimage", "data/grass.png", "CC0", f"linolafett, DeviantArt; {_SK}", "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89"),
    Source("gravel", "skimage", "data/gravel.png", "CC0", f"CC0Textures Gravel04; {_SK}", "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12"),
    Source("text", "skimage", "data/text.png", "public domain", f"Wikipedia File:Corner.png; {_SK}", "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1"),
    Source("horse", "skimage", "data/horse.png", "CC0", f"Andreas Preuss (marauder), openclipart; {_SK}", "c7fb60789fe394c485f842291ea3b21e50d140f39d6dcb5fb9917cc178225455"),
    Source("cell", "skimage", "data/cell.png", "CC0", f"Paul Muller et al., qpformat; {_SK}", "8d23a7fb81f7cc877cd09f330357fc7f595651306e84e17252f6e0a1b3f61515"),
)
# fmt: on
# Left out on purpose: motorcycle_left/right (Middlebury stereo, no licence note in the package),
# moon, page, logo, color, phantom (no licence note, or not photos).


@dataclass(frozen=True)
class Instance:
    """An object to retrieve: a region of a source photo and the object box inside it.

    Attributes:
        name: instance name (used in query names).
        source: key into :data:`SOURCES`.
        region: ``(x0, y0, x1, y1)`` part of the photo the views are cut from (original pixels).
        box: ``(x0, y0, x1, y1)`` the object, inside ``region`` (original pixels).
    """

    name: str
    source: str
    region: tuple[int, int, int, int]
    box: tuple[int, int, int, int]


INSTANCES: tuple[Instance, ...] = (
    Instance("astronaut", "astronaut", (0, 0, 360, 512), (120, 10, 350, 420)),
    Instance("cat_left", "chelsea", (0, 0, 225, 300), (20, 40, 215, 260)),
    Instance("cat_right", "chelsea", (226, 0, 451, 300), (236, 40, 431, 290)),
    Instance("coffee", "coffee", (0, 0, 600, 400), (80, 20, 480, 390)),
    Instance("rocket", "rocket", (150, 0, 500, 427), (170, 120, 480, 427)),
    Instance("pagoda", "china", (0, 0, 400, 427), (60, 25, 370, 427)),
    Instance("dahlia", "flower", (0, 0, 640, 427), (165, 80, 450, 360)),
    Instance("hopper", "grace_hopper", (0, 0, 512, 600), (150, 20, 375, 340)),
    Instance("retina_disc", "retina", (0, 0, 705, 1411), (40, 400, 660, 1000)),
    Instance("retina_macula", "retina", (706, 0, 1411, 1411), (740, 400, 1360, 1000)),
    Instance("ihc_top", "ihc", (0, 0, 512, 256), (30, 20, 480, 236)),
    Instance("ihc_bottom", "ihc", (0, 256, 512, 512), (30, 276, 480, 492)),
    Instance("hubble_west", "hubble", (0, 0, 500, 872), (60, 200, 440, 620)),
    Instance("hubble_east", "hubble", (500, 0, 1000, 872), (560, 250, 960, 650)),
)

# Distractors: (source, region of the photo or None for all of it, number of database views).
# Regions of instance photos are disjoint from every instance region (no pixel in common).
DISTRACTORS: tuple[tuple[str, tuple[int, int, int, int] | None, int], ...] = (
    ("astronaut", (372, 0, 512, 512), 3),
    ("rocket", (0, 0, 140, 427), 3),
    ("rocket", (510, 0, 640, 427), 3),
    ("china", (410, 0, 640, 427), 4),
    ("camera", None, 5),
    ("coins", None, 4),
    ("clock", None, 3),
    ("brick", None, 3),
    ("grass", None, 3),
    ("gravel", None, 3),
    ("text", None, 3),
    ("horse", None, 3),
    ("cell", None, 3),
)


def source_path(src: Source) -> Path:
    """Where ``src`` lies in the installed package (found without importing the package)."""
    spec = importlib.util.find_spec(src.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"demo dataset: package {src.package!r} is not installed (needed for {src.path})")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / src.path
        if p.is_file():
            return p
    raise FileNotFoundError(f"demo dataset: {src.path} not found in the installed {src.package!r} package")


def read_source(src: Source, mismatched: list[str]) -> Image.Image:
    """``src`` as an RGB image (transparency flattened on white); its key is appended to ``mismatched``
    when the file differs from the one this dataset was designed with."""
    path = source_path(src)
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != src.sha256:
        log.warning("demo dataset: %s differs from the file this dataset was designed with; using it anyway", path)
        mismatched.append(src.key)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")
