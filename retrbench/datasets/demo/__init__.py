"""``demo``: a small instance-retrieval benchmark built at first use from photos shipped in packages.

A new user with no data and no internet can run ``retrbench run --model efficientnet_lite0
--dataset demo``. The first call builds the dataset under ``<data_root>/demo-v1/`` in a few
seconds from public-domain, CC0 and CC BY photos that ship inside scikit-image, scikit-learn and
matplotlib (read from the installed packages, never copied into this repository; :data:`SOURCES`
lists each file with its licence and credit, and the manifest repeats them). Later calls reuse it.

Composition (fixed):

* **14 instances** (:data:`INSTANCES`), each a *region* of a photo (the part its views are cut
  from) and an *object box* inside it: astronaut, coffee cup, rocket, pagoda, dahlia, Grace
  Hopper, and four look-alike pairs cut from one photo each, sharing no pixel: the left and right
  halves of the cat's face, the optic disc and macula halves of the retina, the top and bottom of
  the immunohistochemistry slide, the west and east halves of the Hubble deep field. The pairs
  (and the two flag-backed portraits) make an ImageNet descriptor confuse instances, as
  neighbouring buildings do in Oxford.
* **Database, 197 images**: 11 views of each instance (4 mild, 6 strong, 1 beside the object;
  154 in all) and 43 distractors (:data:`DISTRACTORS`): views of 9 other photos (greyscale ones
  kept grey or tinted, all stored as RGB) and of 4 parts of instance photos that lie outside every
  instance region (the shuttle model beside the astronaut, the launch towers beside the rocket,
  the lake beside the pagoda). 384-512 pixels on the longer side, JPEG quality 35-90, about
  4 MB. Names are neutral (``demo_000`` ...) in a seeded shuffled order.
* **28 queries**, two per instance: two more mild views (``query_<instance>_<1|2>``, not in the
  database) that show all of the object, each with its box ``(x0, y0, x1, y1)`` in query-image
  pixels (the bounding box of the object box mapped into the query, clipped to the image).
  Queries are cropped to their box before description (revisited protocol).

Views. Each view is a perspective warp of the instance region: a rotated, scaled, shifted and / or
keystoned quadrilateral of the photo mapped onto the output image (shrunk, then moved towards the
centre until it lies inside the region, so no view shows anything outside it), followed by
photometric changes (brightness, contrast, saturation, sometimes greyscale, blur, noise, JPEG
quality). Mild recipes: near-full view, loose crop around the object, off-centre crop, strong
colour change. Strong recipes: rotation by 40-80 degrees, by 90 / 180 / 270, keystone (a side
shortened by 25-35%), zoom into 45-60% of the object's width, an occluder (a patch of another
photo) over 55-70% of the object, the photo shrunk to 22-32% of the width of another photo.
Beside: a crop centred away from the object.

Labels (``gnd_demo.pkl``) are **measured** on each view's geometry, never taken from the recipe,
and photometric changes never change them. A 32 x 32 grid over the object box is mapped into
the view, and a 32 x 32 grid over the view back into the photo, giving

* ``visible``: fraction of the object inside the view and not under an occluder;
* ``cover``: fraction of the view that shows the (unoccluded) object;
* ``angle``: rotation of the least-squares similarity fitted to the 4 mapped box corners;
  ``rot`` = its difference to the query's, folded to 0-180 degrees;
* ``tilt``: RMS residual of that fit / mapped box size (0 for a similarity, > 0.1 for a
  strong perspective);

and, for a query, a database view of the query's own instance is

* **junk** if ``visible < 0.15`` (the view barely shows the instance);
* **hard** if ``visible < 0.5``, ``rot > 30``, ``tilt > 0.1`` or ``cover < 0.1`` (heavy crop
  or occlusion, strong rotation, strong perspective, or a small object in a larger scene);
* **easy** otherwise.

Everything else (other instances, distractors) is a negative. As built, every query has 3-4 easy,
6-7 hard and 1 junk image. The measurements of every image are in ``views.json``, so the labels
can be checked (the tests recompute them).

Files, in the structure of revisitop's ``gnd_roxford5k.pkl`` so the same loading path is used::

    <data_root>/demo-v1/jpg/<name>.jpg      database images and queries
    <data_root>/demo-v1/gnd_demo.pkl        {"imlist", "qimlist", "gnd": [{"easy", "hard", "junk", "bbx"}]}
    <data_root>/demo-v1/views.json          per image: source, recipe, JPEG quality, measurements
    <data_root>/demo-v1/manifest.json       version, seed, Pillow / numpy versions, sources, sha256 per file

Deterministic: one generator per image seeded from its name, fixed JPEG settings, no metadata;
two builds with the same Pillow / numpy are byte-identical. The build writes a temporary
folder beside the target and moves it into place; a folder whose files do not match its
manifest is rebuilt, a valid one is reused.

Measured (EfficientNet-Lite0 ImageNet weights, L2-normalised descriptors, inner product, queries
cropped; mAP Easy / Medium / Hard in %): images at their stored size, GeM (p=3) 89.9 / 80.1 / 62.3,
MAC 89.9 / 80.8 / 63.2; resized to a 1024-pixel longer side, GeM 81.7 / 71.6 / 53.2, MAC
83.7 / 72.1 / 53.4; random Gaussian descriptors (mean of 20 draws) 3.0 / 6.1 / 4.3.

Modules: :mod:`.catalogue` (which photos, instances and distractors), :mod:`.geometry` (views as
projective maps, the measurements and labels), :mod:`.render` (image synthesis), :mod:`.build`
(the deterministic, atomic build); this module registers the dataset and loads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...types import Query, RetrievalDataset
from .._common import resolve_data_root
from ..base import DATASETS, DatasetInfo
from ..groundtruth import load_gnd_pickle
from .build import DIRNAME, GND_FILE, SEED, VERSION, build_demo, is_valid
from .catalogue import DISTRACTORS, INSTANCES, SOURCES, Instance, Source, source_path
from .geometry import HARD_COVER, HARD_ROTATION, HARD_TILT, HARD_VISIBLE, JUNK_VISIBLE

__all__ = [
    "DIRNAME",
    "DISTRACTORS",
    "GND_FILE",
    "HARD_COVER",
    "HARD_ROTATION",
    "HARD_TILT",
    "HARD_VISIBLE",
    "INSTANCES",
    "JUNK_VISIBLE",
    "SEED",
    "SOURCES",
    "VERSION",
    "Instance",
    "Source",
    "build_demo",
    "is_valid",
    "load_demo",
    "source_path",
]


@DATASETS.register(
    "demo",
    info=DatasetInfo(
        protocol="revisited",
        layout="<data_root>/demo-v1/ (built automatically at first use)",
        label="Demo",
        order=110,
        help="197 views of 14 objects and distractors from package-shipped photos, 28 queries; no download",
        image_size=512,  # stored images are 384-512 pixels: no 1024-pixel upscaling, 4x cheaper on a CPU
    ),
)
def load_demo(data_root: str | Path | None = None) -> RetrievalDataset:
    """The built-in demo dataset (built under ``data_root`` at first use, then reused)."""
    ddir = build_demo(resolve_data_root(data_root))
    data = load_gnd_pickle(ddir / GND_FILE)
    man = json.loads((ddir / "manifest.json").read_text())
    gen = man.get("generator", {})
    n = len(data["imlist"])
    gnd = []
    for g in data["gnd"]:
        entry = {}
        for k in ("easy", "hard", "junk"):
            arr = np.asarray(g[k], dtype=np.int64).reshape(-1)
            if arr.size and (arr.min() < 0 or arr.max() >= n):
                raise ValueError(f"{ddir / GND_FILE}: {k} index out of range [0, {n})")
            entry[k] = arr
        gnd.append(entry)
    queries = tuple(
        Query(f"{q}.jpg", tuple(float(v) for v in g["bbx"]))  # type: ignore[arg-type]
        for q, g in zip(data["qimlist"], data["gnd"], strict=True)
    )
    notes = {
        "query_cropping": "queries are cropped to their bbx (revisited protocol); they are not in the database",
        "source": f"demo-v{VERSION}: synthetic views of photos shipped in scikit-image, scikit-learn and matplotlib",
        "build": f"seed {man['seed']}, Pillow {gen.get('pillow')}, numpy {gen.get('numpy')} (JPEG bytes depend on Pillow)",
        "labels": (
            f"junk: visible object < {JUNK_VISIBLE}; hard: visible < {HARD_VISIBLE}, rotation > {HARD_ROTATION} deg, "
            f"tilt > {HARD_TILT} or cover < {HARD_COVER}; else easy"
        ),
        "images": f"{n} database images",
        "queries": f"{len(queries)} queries",
    }
    differ = sorted(k for k, v in man["sources"].items() if not v.get("matches", True))
    if differ:
        notes["sources_differ"] = f"built from package files that differ from the designed ones: {', '.join(differ)}"
    return RetrievalDataset(
        name="demo",
        root=ddir / "jpg",
        images=tuple(f"{name}.jpg" for name in data["imlist"]),
        queries=queries,
        gnd=tuple(gnd),
        protocol="revisited",
        notes=notes,
    )
