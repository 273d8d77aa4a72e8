"""``resize=cirtorch`` and multi-scale extraction against cirtorch's own algorithm.

The reference below is written from cirtorch's documented behaviour (``datasets/genericdataset.py``
``ImagesFromList``, ``datasets/datahelpers.py`` ``imresize`` / ``pil_loader``,
``networks/imageretrievalnet.py`` ``extract_ss`` / ``extract_ms``): an image is loaded with
``convert('RGB')``; a query is cropped with Pillow's ``crop`` on its box and shrunk by
``thumbnail`` to ``imsize * max(crop) / max(full)``; a database image by ``thumbnail`` to
``imsize``; ``ToTensor`` + ``Normalize``; the network is features -> GeM -> L2; multi-scale
resizes the normalised input by bilinear ``interpolate`` (``align_corners=False``), averages
``v ** p`` over scales (p = GeM's p) and takes the ``1/p`` power, then L2. retrbench's pipeline
must give the same descriptors, to 1e-4, on real photos with the same random weights.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image

from retrbench.types import Query, RetrievalDataset
from retrbench.utils.images import thumbnail_size

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------- the reference


def ref_loader(path: Path) -> Image.Image:
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


def ref_imresize(img: Image.Image, imsize: float) -> Image.Image:
    img.thumbnail((imsize, imsize), Image.Resampling.LANCZOS)
    return img


def ref_input(path: Path, imsize: int, bbx=None) -> torch.Tensor:
    """cirtorch's ImagesFromList.__getitem__ followed by ToTensor + Normalize: ``(1, 3, H, W)``."""
    img = ref_loader(path)
    imfullsize = max(img.size)
    if bbx is not None:
        img = img.crop(bbx)
    img = ref_imresize(img, imsize * max(img.size) / imfullsize) if bbx is not None else ref_imresize(img, imsize)
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    return x[None]


def ref_net(features: torch.nn.Module, p: float):
    def net(x: torch.Tensor) -> torch.Tensor:  # features -> GeM -> L2N
        m = features(x)
        v = torch.nn.functional.avg_pool2d(m.clamp(min=1e-6).pow(p), (m.size(-2), m.size(-1))).pow(1.0 / p)
        v = v.flatten(1)
        return v / (torch.norm(v, p=2, dim=1, keepdim=True) + 1e-6).expand_as(v)

    return net


def ref_extract_ms(net, x: torch.Tensor, ms: list[float], msp: float) -> torch.Tensor:
    v = None
    for s in ms:
        xt = x.clone() if s == 1 else torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
        d = net(xt).pow(msp).squeeze()
        v = d if v is None else v + d
    v = v / len(ms)
    v = v.pow(1.0 / msp)
    return v / v.norm()


# ------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def photos() -> tuple[Path, list[str]]:
    root = shared_path("oxford-demo")
    return root, sorted(p.name for p in root.glob("*.jpg"))[:6]


BOXES = [(136.2, 34.5, 648.7, 455.1), (10.5, 20.4, 94.9, 144.6), (300.0, 200.0, 420.5, 270.5)]  # large, small, mid (.5 rounding)


@pytest.fixture(scope="module")
def backbone():
    from retrbench.backbones import BACKBONES

    torch.manual_seed(0)
    net = BACKBONES.create("timm:resnet18", pretrained=False)
    net.info = dataclasses.replace(net.info, mean=MEAN, std=STD)  # ImageNet normalisation, as cirtorch
    return net


def _dataset(root: Path, names: list[str]) -> RetrievalDataset:
    queries = tuple(Query(names[i], BOXES[i]) for i in range(len(BOXES)))
    gnd = tuple({"ok": np.array([0]), "junk": np.array([], np.int64)} for _ in queries)
    return RetrievalDataset("oxford-demo", root, tuple(names), queries, gnd, "map")


def _ours(ds, backbone, size, scales, tmp_path):
    from retrbench.pipeline import dataset_features

    db, q, _ = dataset_features(
        ds, backbone, pooling="gem", image_size=size, resize="cirtorch", scales=scales, workers=0, device="cpu", cache_dir=tmp_path
    )
    norm = lambda a: np.asarray(a) / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    return norm(db), norm(q)


@pytest.mark.realdata
@pytest.mark.parametrize("scales", [(1.0,), (1.0, 1 / math.sqrt(2), 0.5)], ids=["single", "multi"])
def test_cirtorch_mode_equals_the_reference(photos, backbone, scales, tmp_path):
    root, names = photos
    size = 320
    ds = _dataset(root, names)
    db, q = _ours(ds, backbone, size, scales, tmp_path)
    net = ref_net(backbone.eval(), 3.0)
    with torch.no_grad():
        for i, name in enumerate(names):
            x = ref_input(root / name, size)
            ref = net(x).squeeze() if len(scales) == 1 else ref_extract_ms(net, x, list(scales), 3.0)
            np.testing.assert_allclose(db[i], ref.numpy(), atol=1e-4, err_msg=f"database {name}")
        for j, query in enumerate(ds.queries):
            x = ref_input(root / query.image, size, query.bbox)
            ref = net(x).squeeze() if len(scales) == 1 else ref_extract_ms(net, x, list(scales), 3.0)
            np.testing.assert_allclose(q[j], ref.numpy(), atol=1e-4, err_msg=f"query {j}")


@pytest.mark.realdata
def test_queries_stay_at_the_database_scale_and_are_never_enlarged(photos):
    from retrbench.utils.images import ImageSpec, load_image, target_size

    root, names = photos
    full = Image.open(root / names[1])
    spec = ImageSpec(root / names[1], BOXES[1], 320, resize="cirtorch")
    w, h = target_size(spec)
    # the 84 x 124 box of a 1024-pixel photo becomes about 26 x 39 at 320, not 217 x 320
    assert max(w, h) <= math.ceil(320 * 124 / max(full.size)) and tuple(load_image(spec).shape[2:0:-1]) == (w, h)
    small = ImageSpec(root / names[0], None, 4096, resize="cirtorch")  # thumbnail never enlarges
    assert target_size(small) == Image.open(root / names[0]).size


def test_thumbnail_size_is_pillows_rule():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        w, h = (int(v) for v in rng.integers(1, 3000, 2))
        size = float(rng.uniform(1, 3500))
        img = Image.new("1", (w, h))
        img.thumbnail((size, size))
        assert thumbnail_size(w, h, size) == img.size, (w, h, size)
