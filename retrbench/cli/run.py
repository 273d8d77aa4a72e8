"""``retrbench run``: options generated from RunConfig and the registries."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .main import UsageError, command

FORMATS = ("markdown", "latex", "html", "csv")


def _whiten(text: str) -> int | str | None:
    if text.lower() in ("none", "no", "off"):
        return None
    if text == "shipped" or text.startswith("shipped:"):
        return text
    try:
        dim = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--whiten takes a dimension, 'shipped[:NAME]' or 'none', got {text!r}") from None
    if dim < 1:
        raise argparse.ArgumentTypeError(f"--whiten dimension must be a positive integer (or 'none'), got {dim}")
    return dim


def _option(text: str) -> tuple[str, object]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"--dataset-option expects KEY=VALUE, got {text!r}")
    import yaml

    return key.strip(), yaml.safe_load(value)


def _choices(registry: Any) -> str:
    """``name (help)`` for every entry, then the resolvers' prefixes."""
    items = [f"{e.name} ({e.help.rstrip('.')})" if e.help else e.name for e in registry]
    items += [f"{r.prefix}... ({r.help.rstrip('.')})" if r.prefix else r.help for r in registry.resolvers]
    return "; ".join(items)


def _run_args(p: argparse.ArgumentParser) -> None:
    from ..backbones import BACKBONES
    from ..config import RunConfig, field_help
    from ..datasets import DATASETS
    from ..pooling import POOLINGS
    from ..rerank import RERANKERS

    d, h = RunConfig(), field_help()
    from ..config import PRESETS

    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named set of settings, e.g. icmr21 (the ICMR 2021 paper's: fixed resolution, R-MAC, 512-d whitening, BatchNorm re-calibration by train() passes); it fills every option left at its default value (an option set to anything else wins)")
    p.add_argument("--model", default=d.model, help=f"{h['model']} Known: {', '.join(BACKBONES.list())}, or {', '.join(r.prefix + '...' for r in BACKBONES.resolvers if r.prefix)} (default %(default)s)")
    p.add_argument("--weights", default=None, help=h["weights"])
    p.add_argument("--dataset", default=d.dataset, help=f"{h['dataset']} {_choices(DATASETS)} (default %(default)s)")
    p.add_argument("--data-root", default=None, help=h["data_root"])
    p.add_argument("--image-size", type=int, default=None, help=h["image_size"])
    p.add_argument("--resize", default=None, metavar="MODE", help=h["resize"])
    p.add_argument("--query-resize", choices=("crop", "full"), default=d.query_resize, help=h["query_resize"])
    p.add_argument("--scales", default="1", metavar="S,S,...", help=h["scales"] + " (default %(default)s)")
    p.add_argument("--scale-mean", choices=("gem", "arithmetic"), default=d.scale_mean, help=h["scale_mean"])
    p.add_argument("--feature-map-size", default=None, metavar="HxW", help=h["feature_map_size"])
    p.add_argument("--pooling", default=str(d.pooling), help=f"NAME[:key=value,...]: {_choices(POOLINGS)} (default %(default)s)")
    p.add_argument("--whiten", type=_whiten, default=d.whiten, help=f"{h['whiten']} Give a dimension or 'none' (default %(default)s)")
    p.add_argument("--whiten-source", default=None, help=h["whiten_source"])
    p.add_argument("--rerank", default=str(d.rerank), help=f"none, or steps joined by '+' run in the order written (dba+aqe+dfs), each NAME[:key=value,...]: {_choices(RERANKERS)} (default %(default)s)")
    p.add_argument("--bn-recalibrate", type=int, default=d.bn_recalibrate, metavar="N", help=h["bn_recalibrate"])
    p.add_argument("--bn-momentum", type=float, default=None, metavar="M", help=h["bn_momentum"])
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=h["batch_size"] + " (default %(default)s)")
    p.add_argument("--device", default=d.device, help=h["device"])
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=d.dtype, help=h["dtype"])
    p.add_argument("--workers", type=int, default=d.workers, help=h["workers"] + " (default %(default)s)")
    p.add_argument("--dataset-option", type=_option, action="append", default=[], metavar="KEY=VALUE", help=h["dataset_options"] + " (repeatable)")
    p.add_argument("--topk", type=int, default=None, help=h["topk"])
    p.add_argument("--index", default=d.index, metavar="SPEC", help=h["index"] + " (default %(default)s)")
    p.add_argument("--nprobe", type=int, default=None, help=h["nprobe"])
    p.add_argument("--efsearch", type=int, default=None, help=h["efsearch"])
    p.add_argument("--index-train-size", type=int, default=None, metavar="N", help=h["index_train_size"])
    p.add_argument("--exif", action=argparse.BooleanOptionalAction, default=None, help=h["exif"])
    p.add_argument("--max-pixels", type=int, default=d.max_pixels, metavar="N", help=h["max_pixels"] + " (default %(default)s)")
    p.add_argument("--allow-missing", action="store_true", help=h["allow_missing"])
    p.add_argument("--format", choices=FORMATS, default="markdown", help="table format printed (default %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write rows, timings and notes as JSON to FILE ('-': print JSON instead of the table)")
    p.add_argument("--results-dir", default="results", help="append tidy rows to DIR/results.jsonl ('none' to skip; default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(a: argparse.Namespace) -> Any:
    from ..config import RunConfig
    from ..pipeline import check_config

    try:
        cfg = _build(a, RunConfig)
        check_config(cfg)
    except (KeyError, ValueError, TypeError) as e:
        raise UsageError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e
    return cfg


def _build(a: argparse.Namespace, RunConfig: Any) -> Any:  # noqa: N803
    """The RunConfig of the parsed options, over the preset's values for options left at their defaults."""
    from ..config import PRESETS

    explicit = {}
    if getattr(a, "preset", None):
        defaults = RunConfig().to_dict()
        for key, value in PRESETS[a.preset].items():
            given = getattr(a, key, None)
            if given is None or (key in defaults and str(given) == str(defaults[key])):
                explicit[key] = value
    cfg = RunConfig(
        model=a.model,
        weights=a.weights,
        dataset=a.dataset,
        data_root=a.data_root,
        image_size=a.image_size,
        resize=a.resize,
        query_resize=a.query_resize,
        scales=a.scales,
        scale_mean=a.scale_mean,
        feature_map_size=a.feature_map_size,
        pooling=a.pooling,
        whiten=a.whiten,
        whiten_source=a.whiten_source,
        rerank=a.rerank,
        batch_size=a.batch_size,
        bn_recalibrate=a.bn_recalibrate,
        bn_momentum=a.bn_momentum,
        device=a.device,
        dtype=a.dtype,
        workers=a.workers,
        allow_missing=a.allow_missing,
        dataset_options=tuple(a.dataset_option),
        topk=a.topk,
        index=a.index,
        nprobe=a.nprobe,
        efsearch=a.efsearch,
        index_train_size=a.index_train_size,
        exif=a.exif,
        max_pixels=a.max_pixels or None,
    )
    return cfg.replace(**explicit) if explicit else cfg


def _write_json(path: str, payload: dict[str, Any]) -> None:
    from ..results import json_safe

    text = json.dumps(json_safe(payload), indent=1, default=str, allow_nan=False)  # NaN -> null: strict JSON
    if path == "-":
        print(text)
        return
    from ..utils.io import atomic_write_text

    atomic_write_text(path, text + "\n")


@command(
    "run",
    args=_run_args,
    order=0,
    help="extract, whiten, search, rerank and evaluate one configuration",
    examples=(
        "retrbench run --model efficientnet_lite0 --dataset demo --pooling gem --whiten none",
        "retrbench run --model efficientnet_lite0 --dataset demo --rerank dba+aqe --format latex",
        "retrbench run --model simclr2x+simclr4x --dataset roxford5k --pooling rmac --whiten 512 --whiten-source rparis6k",
        "retrbench run --model timm:resnet50 --weights my.pth --dataset folder:/photos --json -",
    ),
)
def cmd_run(a: argparse.Namespace) -> int:
    import warnings

    from ..pipeline import WhiteningNote, run
    from ..results import render

    cfg = _config(a)
    results_dir = None if a.results_dir.lower() == "none" else a.results_dir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WhiteningNote)  # printed below as a note
        res = run(cfg, results_dir=results_dir, progress=not a.no_progress and sys.stderr.isatty())
    i = res.info
    if a.json:
        _write_json(a.json, {"config": cfg.to_dict(), "rows": res.rows, "info": i})
    if a.json != "-":
        print(render(res.table(), a.format))
    note = i.get("whitening", {}).get("note")
    if note:
        print(f"note: {note}", file=sys.stderr)
    print(
        f"{res.config.model} on {res.config.dataset}: {i['total_s']:.1f} s "
        f"(extraction {i['extract_s']:.1f} s, {i['cache_hits']} of {2 * len(cfg.models)} descriptor sets from cache)"
        + (f"; rows appended to {i['results_file']}" if "results_file" in i else ""),
        file=sys.stderr,
    )
    return 0
