"""Run configuration: a frozen dataclass of parsed values that round-trips through dicts / YAML
and keys caches.

Spec strings (``--pooling gem:p=4``, ``--rerank dba+aqe``, ``--model a+b``) are parsed once,
here, by :mod:`retrbench.specs`; stages receive the typed values. Whether a name exists is
checked by the registry that builds it (the pipeline builds every stage before extracting
anything, so a typo fails in a second, not after an hour of extraction).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from .specs import ModelRef, Pipeline, Step, parse_models, parse_pipeline, parse_step
from .utils.io import stable_hash

# Pillow's DecompressionBombError threshold (2 x Image.MAX_IMAGE_PIXELS); equals
# retrbench.utils.images.DEFAULT_MAX_PIXELS (a test checks), repeated here so that importing the
# configuration does not import Pillow and torch.
DEFAULT_MAX_PIXELS = 178_956_970

__all__ = ["DEFAULT_MAX_PIXELS", "PRESETS", "RunConfig", "apply_preset", "parse_hw", "check_keys", "config_id", "field_help", "stable_hash"]


def parse_hw(text: str | tuple[int, int], what: str) -> tuple[int, int]:
    """``"384x512"`` (or ``(384, 512)``) -> ``(384, 512)``: height, width, positive integers."""
    if isinstance(text, (tuple, list)) and len(text) == 2:
        h, w = text
    else:
        parts = str(text).lower().replace(" ", "").split("x")
        if len(parts) != 2:
            raise ValueError(f"{what}: expected HxW (e.g. 384x512), got {text!r}")
        try:
            h, w = int(parts[0]), int(parts[1])
        except ValueError:
            raise ValueError(f"{what}: expected HxW with integers (e.g. 384x512), got {text!r}") from None
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"{what}: height and width must be positive, got {text!r}")
    return int(h), int(w)


def _canonical_resize(text: str) -> str:
    mode, _, arg = str(text).strip().lower().partition(":")
    if mode == "fixed":
        h, w = parse_hw(arg, "resize fixed:HxW")
        return f"fixed:{h}x{w}"
    if arg or mode not in ("longer", "cirtorch"):
        raise ValueError(f"resize must be 'cirtorch', 'longer' or 'fixed:HxW', got {text!r}")
    return mode


def _parse_scales(value: object) -> tuple[float, ...]:
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (tuple, list)) else [value]
    try:
        scales = tuple(float(v) for v in items if str(v).strip())
    except (TypeError, ValueError):
        raise ValueError(f"scales: expected positive numbers such as 1,0.7071,0.5, got {value!r}") from None
    if not scales or any(not (s > 0) or s == float("inf") for s in scales):
        raise ValueError(f"scales: expected positive numbers such as 1,0.7071,0.5, got {value!r}")
    return scales


# Named sets of RunConfig fields (``--preset NAME``, ``preset:`` in experiment files): the given
# fields replace the defaults; anything the user sets explicitly wins over the preset.
PRESETS: dict[str, dict[str, Any]] = {
    # Krishna, McGuinness and O'Connor, "Evaluating Contrastive Models for Instance-based Image
    # Retrieval", ICMR 2021, Section 4.1 (the seed 001 text):
    "icmr21": {
        # "We resize our input images to a fixed resolution of [lost] giving a feature spatial
        # dimension of [lost]": the number did not survive in the text; 224 x 224 (ResNet-50's
        # 7 x 7 map) is an assumption, stated here and in every row (resize).
        "resize": "fixed:224x224",
        "pooling": "rmac",  # "we use R-MAC over spatial dimensions"
        "whiten": 512,  # "normalization, PCA-whitening, and normalization again"; "PCA dimension of 512"
        # "we first run each of the models in training mode (PyTorch model.train() just
        # feed-forward) to tune the batch-normalization statistics": every database image, with
        # PyTorch's default momentum
        "bn_recalibrate": 1_000_000_000,
        "bn_momentum": 0.1,
    },
}


def apply_preset(name: str | None, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` over the preset's values (the preset only fills what ``fields`` lacks)."""
    if not name:
        return dict(fields)
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} (known: {', '.join(PRESETS)})")
    return {**PRESETS[name], **fields}


def check_keys(keys: Iterable[str], allowed: Iterable[str], where: str) -> None:
    """Raise ``ValueError`` naming every key not in ``allowed`` (with close matches)."""
    allowed = list(allowed)
    bad = [k for k in keys if k not in allowed]
    if bad:
        hints = []
        for k in bad:
            close = difflib.get_close_matches(str(k), allowed, n=2)
            hints.append(f"{k!r}" + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""))
        raise ValueError(f"{where}: unknown key(s) {', '.join(hints)}; allowed: {', '.join(allowed)}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one benchmark run.

    Attributes:
        model: backbone name (``retrbench models``; also ``timm:NAME``, ``hub:REPO:ENTRY``,
            ``hf-hub:ORG/REPO``), ``random`` for chance level, ``a+b`` for an ensemble.
            Parsed into :attr:`models`.
        weights: checkpoint path overriding where the entry's weights come from (``wa+wb``
            for an ensemble).
        dataset: dataset registry name (``retrbench datasets``).
        data_root: where datasets live (default ``$RETRBENCH_DATA``).
        image_size: image size in pixels (the longer side, or cirtorch's thumbnail size); None
            uses the dataset's (1024 unless the dataset says otherwise; never the model's).
        resize: how images become inputs: ``cirtorch`` (exactly cirtorch's ImagesFromList:
            thumbnails that never enlarge, query crops kept at the database's scale), ``longer``
            (longer side = image_size, up or down; queries by query_resize) or ``fixed:HxW``
            (every image and query crop to one resolution, as the ICMR 2021 paper); None uses
            the dataset's default (cirtorch for rOxford / rParis / Oxford / Paris / INSTRE).
        query_resize: with resize=longer: ``crop`` crops the query box and then resizes the crop
            so its longer side is image_size (small boxes are enlarged); ``full`` resizes the
            full query image as a database image and then crops the box (database scale).
        scales: image scales whose descriptors are combined (e.g. 1, 0.7071, 0.5 as cirtorch
            and most rOxford / rParis papers); (1,) is single-scale.
        scale_mean: how multi-scale descriptors are combined: ``gem`` (cirtorch's extract_ms:
            power mean with the GeM exponent for GeM pooling, 1 otherwise) or ``arithmetic``
            (InsCLR's test-time mean of the L2-normalised per-scale descriptors).
        feature_map_size: ``HxW``: resample every feature map to this size before pooling (the
            paper's AMDIM treatment): area averaging when shrinking, bilinear when enlarging.
        pooling: pooling :class:`~retrbench.specs.Step` (a string such as ``gem``, ``gem:p=4``,
            ``rmac:levels=3`` or ``native`` is parsed on construction).
        whiten: PCA-whitening output dimension; None (the default) keeps the L2-normalised
            descriptor. Whitening learned on a small database amplifies noise (on the 197-image
            demo, 512 is capped to 196 and Medium mAP falls from 77 to 43): learn it elsewhere
            (``whiten_source``) or on a large collection. ``shipped`` (or ``shipped:NAME``) applies
            the whitening a checkpoint ships instead (GeM-AP's PCA, cirtorch's learned whitening),
            as its authors evaluate it.
        whiten_source: dataset to learn the whitening on; None learns it on the database.
        rerank: rerank :class:`~retrbench.specs.Pipeline` (a string such as ``none``, ``aqe``
            or ``dba+aqe:k=5`` is parsed on construction).
        batch_size: images per forward pass (images of equal size are batched together).
        device: ``auto`` (GPU when present), ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: the network's precision: ``float32`` (default), ``float16`` or ``bfloat16``
            (``torch.autocast``; float16 needs a GPU); pooling and descriptors stay float32.
        workers: image-decoding worker processes (0 decodes in the main process).
        bn_recalibrate: before extraction, re-estimate BatchNorm statistics on this many
            database images (training-mode forward passes, cumulative average), as the paper
            does; 0 keeps the checkpoint's statistics.
        bn_momentum: momentum of the BatchNorm re-calibration: None (default) keeps a
            cumulative average over the images (every batch weighs the same); 0.1 is PyTorch's
            default, i.e. plain ``model.train()`` forward passes as the ICMR 2021 paper does
            (an exponential average dominated by the last batches). Recorded in the rows.
        allow_missing: evaluate on the images present when a dataset is incomplete.
        dataset_options: extra keyword options of the dataset loader as ``(key, value)`` pairs,
            e.g. ``(("max_distractors", 1000),)`` or ``(("split", "public"),)``.
        exif: apply the images' EXIF orientation (phone photos stored sideways); None uses the
            dataset's default: on for folder: datasets, off for the benchmarks (read as stored,
            as the reference code does).
        max_pixels: images above this many pixels are refused with a clear error instead of
            being decoded (decompression bombs); 0 or None: no limit. The default is Pillow's
            own error threshold.
        index: ``flat`` (exact search, default) or a faiss index_factory string (``IVF4096,Flat``,
            ``IVF65536,PQ64``, ``HNSW32``): approximate, its recall@k against exact search is
            measured on the queries and written into the rows.
        nprobe: inverted lists visited by an IVF index (None: faiss's default).
        efsearch: search depth of an HNSW index (None: faiss's default).
        index_train_size: vectors the index is trained on (None: a size suited to the index).
        topk: length of the ranking kept per query; None keeps the full ranking for databases
            up to 100,000 images and the top 1,000 beyond (100 for GLDv2's mAP@100).
    """

    model: str = "efficientnet_lite0"
    weights: str | None = None
    dataset: str = "demo"
    data_root: str | None = None
    image_size: int | None = None
    resize: str | None = None
    query_resize: str = "crop"
    scales: tuple[float, ...] = (1.0,)
    scale_mean: str = "gem"
    feature_map_size: str | None = None
    pooling: Step = Step("gem")
    whiten: int | str | None = None
    whiten_source: str | None = None
    rerank: Pipeline = Pipeline()
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "float32"
    workers: int = 2
    bn_recalibrate: int = 0
    bn_momentum: float | None = None
    allow_missing: bool = False
    dataset_options: tuple[tuple[str, Any], ...] = ()
    topk: int | None = None
    index: str = "flat"
    nprobe: int | None = None
    efsearch: int | None = None
    index_train_size: int | None = None
    exif: bool | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        object.__setattr__(self, "pooling", parse_step(self.pooling, "pooling spec"))
        object.__setattr__(self, "rerank", parse_pipeline(self.rerank, "rerank spec"))
        models = parse_models(self.model, self.weights)
        object.__setattr__(self, "model", "+".join(m.name for m in models))
        object.__setattr__(self, "_models", models)
        object.__setattr__(self, "scales", _parse_scales(self.scales))
        if self.scale_mean not in ("gem", "arithmetic"):
            raise ValueError(f"scale_mean must be 'gem' or 'arithmetic', got {self.scale_mean!r}")
        if self.resize is not None:
            object.__setattr__(self, "resize", _canonical_resize(self.resize))
        if self.feature_map_size is not None:
            object.__setattr__(self, "feature_map_size", "x".join(map(str, parse_hw(self.feature_map_size, "feature_map_size"))))
        if self.query_resize not in ("crop", "full"):
            raise ValueError(f"query_resize must be 'crop' or 'full', got {self.query_resize!r}")
        if self.image_size is not None and self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if isinstance(self.whiten, str):
            if not (self.whiten == "shipped" or self.whiten.startswith("shipped:")):
                raise ValueError(f"whiten must be a positive dimension, 'shipped[:NAME]' or None, got {self.whiten!r}")
        elif self.whiten is not None and (isinstance(self.whiten, bool) or self.whiten < 1):
            raise ValueError(f"whiten must be a positive dimension, 'shipped[:NAME]' or None, got {self.whiten}")
        if self.max_pixels is not None and (isinstance(self.max_pixels, bool) or self.max_pixels < 0):
            raise ValueError(f"max_pixels must be a number of pixels >= 0 (0 or None: no limit), got {self.max_pixels!r}")
        if self.topk is not None and self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        object.__setattr__(self, "dataset_options", tuple((str(k), v) for k, v in dict(self.dataset_options).items()))
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.bn_momentum is not None and not (0 < float(self.bn_momentum) <= 1):
            raise ValueError(f"bn_momentum must be in (0, 1] or None (cumulative average), got {self.bn_momentum!r}")
        if self.bn_recalibrate < 0:
            raise ValueError(f"bn_recalibrate must be >= 0 images, got {self.bn_recalibrate}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def models(self) -> tuple[ModelRef, ...]:
        """The backbones of :attr:`model` with their weights (several for an ensemble)."""
        return self._models  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON / YAML values: specs as their canonical strings."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["pooling"] = str(self.pooling)
        d["rerank"] = str(self.rerank)
        d["dataset_options"] = [list(kv) for kv in self.dataset_options]
        d["scales"] = list(self.scales)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from a dict (e.g. parsed YAML); unknown keys are an error naming them."""
        check_keys(d, [f.name for f in fields(cls)], "RunConfig")
        d = dict(d)
        if "dataset_options" in d and d["dataset_options"] is not None:
            opts = d["dataset_options"]
            d["dataset_options"] = tuple(opts.items()) if isinstance(opts, dict) else tuple(tuple(kv) for kv in opts)
        return cls(**d)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)


def field_help() -> dict[str, str]:
    """Each :class:`RunConfig` field's description from its docstring (the CLI's help texts)."""
    import inspect
    import re

    doc = inspect.getdoc(RunConfig) or ""
    body = doc.split("Attributes:", 1)[-1]
    out: dict[str, str] = {}
    name = None
    for line in body.splitlines():
        m = re.match(r"^    (\w+): (.*)$", line)
        if m and m.group(1) in RunConfig.__dataclass_fields__:
            name = m.group(1)
            out[name] = m.group(2).strip()
        elif name and line.startswith("        "):
            out[name] += " " + line.strip()
    role = re.compile(r":\w+:`~?([\w.]+)`")
    return {k: role.sub(lambda m: m.group(1).split(".")[-1], v).replace("``", "") for k, v in out.items()}


def config_id(cfg: RunConfig) -> str:
    """Identity of a configuration for results: the hash of its non-default fields only, so
    that adding a field with a default to :class:`RunConfig` keeps earlier ids valid."""
    default = RunConfig().to_dict()
    return stable_hash({k: v for k, v in cfg.to_dict().items() if v != default[k]})
