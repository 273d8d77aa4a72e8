"""Command line: ``retrbench run | models | datasets | evaluate``.

The CLI only parses arguments into a :class:`~retrbench.config.RunConfig` (or plain values)
and calls the library; it is the only place that prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]


def _whiten(text: str) -> int | None:
    if text.lower() in ("none", "no", "off", "0"):
        return None
    try:
        dim = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--whiten takes a dimension or 'none', got {text!r}") from None
    if dim < 1:
        raise argparse.ArgumentTypeError(f"--whiten dimension must be positive, got {dim}")
    return dim


def _option(text: str) -> tuple[str, object]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise ValueError(f"--dataset-option expects KEY=VALUE, got {text!r}")
    import yaml

    return key.strip(), yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .config import RunConfig

    d = RunConfig()
    p = argparse.ArgumentParser(prog="retrbench", description="Benchmark frozen networks for instance-level image retrieval.")
    p.add_argument("--version", action="version", version=f"retrbench {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="extract, whiten, search, rerank and evaluate one configuration")
    r.add_argument("--model", default=d.model, help=f"backbone name (see `retrbench models`; default {d.model})")
    r.add_argument("--weights", default=None, help="checkpoint file overriding the entry's weights")
    r.add_argument("--dataset", default=d.dataset, help=f"dataset name (see `retrbench datasets`; default {d.dataset})")
    r.add_argument("--data-root", default=None, help="where datasets live (default $RETRBENCH_DATA or ~/.cache/retrbench/data)")
    r.add_argument("--image-size", type=int, default=None, help="longer image side in pixels (default: the model's)")
    r.add_argument("--query-resize", choices=("crop", "full"), default=d.query_resize, help="crop then resize the query box (crop), or resize the full image then crop (full)")
    r.add_argument("--pooling", default=d.pooling, help="mac, spoc, gem[:p=3], rmac[:levels=3] (default %(default)s)")
    r.add_argument("--whiten", type=_whiten, default=d.whiten, help="PCA-whitening dimension, or 'none' for the plain L2 descriptor (default %(default)s)")
    r.add_argument("--whiten-source", default=None, help="dataset to learn the whitening on (default: the database itself)")
    r.add_argument("--rerank", default=d.rerank, help="none, aqe, dba, dfs, dfs-offline and +-joined combinations (dba+aqe+dfs), with parameters: aqe:k=10,alpha=3 (default %(default)s)")
    r.add_argument("--bn-recalibrate", type=int, default=0, metavar="N", help="re-estimate BatchNorm statistics on N database images before extracting (the paper's protocol)")
    r.add_argument("--batch-size", type=int, default=d.batch_size)
    r.add_argument("--device", default=d.device, help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    r.add_argument("--workers", type=int, default=d.workers, help="image decoding processes")
    r.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE", help="dataset loader option, e.g. max_distractors=1000 (repeatable)")
    r.add_argument("--topk", type=int, default=None, help="ranking length kept per query (default: full up to 100k images)")
    r.add_argument("--allow-missing", action="store_true", help="evaluate on the images present when the dataset is incomplete")
    r.add_argument("--format", choices=("markdown", "latex", "html", "csv"), default="markdown", help="table format printed")
    r.add_argument("--results-dir", default="results", help="append tidy rows to DIR/results.jsonl ('none' to skip)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")

    from .reporting_cli import add_subcommands

    add_subcommands(sub)

    sub.add_parser("models", help="list the backbone registry")
    ds = sub.add_parser("datasets", help="list the known datasets and where they are expected")
    ds.add_argument("--data-root", default=None)

    e = sub.add_parser("evaluate", help="evaluate your own rankings against a ground-truth file")
    e.add_argument("--ranks", required=True, help=".npy integer array (queries, database), one row per query, best first")
    e.add_argument("--gnd", required=True, help="ground-truth pickle (gnd_*.pkl: imlist, qimlist, gnd)")
    e.add_argument("--protocol", default="revisited", help="revisited, classic, ukbench or map")
    e.add_argument("--kappas", default="1,5,10", help="k values of mP@k (default %(default)s)")
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    e.add_argument("--format", choices=("markdown", "latex", "html", "csv"), default="markdown")

    from .datasets.download import add_download_subcommand

    add_download_subcommand(sub)

    from .train.cli import add_train_subcommand

    add_train_subcommand(sub)
    return p


def _cmd_run(a: argparse.Namespace) -> int:
    from .config import RunConfig
    from .pipeline import run

    cfg = RunConfig(
        model=a.model,
        weights=a.weights,
        dataset=a.dataset,
        data_root=a.data_root,
        image_size=a.image_size,
        query_resize=a.query_resize,
        pooling=a.pooling,
        whiten=a.whiten,
        whiten_source=a.whiten_source,
        rerank=a.rerank,
        batch_size=a.batch_size,
        bn_recalibrate=a.bn_recalibrate,
        device=a.device,
        workers=a.workers,
        allow_missing=a.allow_missing,
        dataset_options=tuple(_option(o) for o in a.dataset_option),
        topk=a.topk,
    )
    results_dir = None if a.results_dir.lower() == "none" else a.results_dir
    res = run(cfg, results_dir=results_dir, progress=not a.no_progress and sys.stderr.isatty())
    from .results import render

    print(render(res.table(), a.format))
    i = res.info
    note = i.get("whitening", {}).get("note")
    if note:
        print(f"\nnote: {note}", file=sys.stderr)
    print(
        f"\n{res.config.model} on {res.config.dataset}: {i['total_s']:.1f} s "
        f"(extraction {i['extract_s']:.1f} s, {i['cache_hits']}/2 from cache)"
        + (f"; rows appended to {i['results_file']}" if "results_file" in i else ""),
        file=sys.stderr,
    )
    return 0


def _cmd_models(a: argparse.Namespace) -> int:
    import pandas as pd

    from .backbones import BACKBONES, local_weights

    rows = []
    for e in BACKBONES:
        info = e.info
        rows.append(
            {
                "name": e.name,
                "aliases": ", ".join(e.aliases),
                "channels": info.channels,
                "stride": info.stride,
                "mean/std": f"{tuple(info.mean)} / {tuple(info.std)}",
                "size": info.default_size,
                "weights": info.weights_source,
                "weights here": "n/a" if not info.weights_file else ("yes" if local_weights(e.name) else "no"),
            }
        )
    print(pd.DataFrame(rows).to_markdown(index=False))
    return 0


def _cmd_datasets(a: argparse.Namespace) -> int:
    import pandas as pd

    from .datasets import DATASETS, default_data_root

    root = Path(a.data_root) if a.data_root else default_data_root()
    rows = [
        {"name": e.name, "aliases": ", ".join(e.aliases), "protocol": e.info.protocol, "expected at": e.info.layout.replace("<data_root>", str(root)), "about": e.info.description}
        for e in DATASETS
    ]
    print(pd.DataFrame(rows).to_markdown(index=False))
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd

    from .datasets import load_gnd_pickle
    from .evaluation import evaluate, gnd_from_pickle

    try:
        ranks = np.load(a.ranks, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise SystemExit(f"retrbench evaluate: cannot read --ranks {a.ranks}: {e}") from None
    gnd = gnd_from_pickle(load_gnd_pickle(a.gnd), a.protocol)
    kappas = tuple(int(k) for k in a.kappas.split(",") if k.strip())
    metrics = evaluate(ranks, gnd, a.protocol, kappas=kappas)
    df = pd.DataFrame([{"split": m.split, "metric": m.name, "value": m.value} for m in metrics])
    if a.json:
        Path(a.json).write_text(json.dumps({"ranks": a.ranks, "gnd": a.gnd, "protocol": a.protocol, "metrics": df.to_dict("records")}, indent=1))
    wide = df.assign(col=lambda t: t.split.str.capitalize() + " " + t.metric).set_index("col")["value"].to_frame().T
    wide.index = [Path(a.ranks).name]
    if a.format == "markdown":
        print(wide.to_markdown(floatfmt=".2f"))
    elif a.format == "latex":
        print(wide.style.format(precision=2).to_latex(hrules=True))
    elif a.format == "html":
        print(wide.style.format(precision=2).to_html())
    else:
        print(wide.to_csv(float_format="%.2f"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * args.verbose, format="%(levelname)s %(name)s: %(message)s")
    from .datasets.download import cmd_download
    from .reporting_cli import COMMANDS
    from .train.cli import run_train_command

    handlers = {"run": _cmd_run, "models": _cmd_models, "datasets": _cmd_datasets, "evaluate": _cmd_evaluate, "download": cmd_download, "train": run_train_command}
    cmd = {**handlers, **COMMANDS}[args.command]
    try:
        return cmd(args)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"retrbench {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
