"""``retrbench extract`` (descriptor files out) and ``retrbench evaluate`` (metrics of your own
rankings, or of descriptor files from any tool, against a ground truth).

``extract`` takes every ``run`` option that changes descriptors (the option builder of
``retrbench run`` is reused, minus the options that act after extraction), so the two never
drift apart; ``evaluate --features`` runs what ``run`` runs after extraction.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .main import UsageError, command
from .run import FORMATS, _write_json

# ``run`` options that act after extraction (evaluate --features takes them) or shape its report
_NOT_FOR_EXTRACT = ("--whiten", "--whiten-source", "--rerank", "--topk", "--format", "--json", "--results-dir")
_FEATURE_OPTIONS = ("whiten", "whiten_features", "rerank", "topk")
_OUT_HELP = (
    "descriptor file; its suffix picks the format: .npz, .h5 / .hdf5 (needs h5py), .mat (revisitop's layout: "
    "X, Q as D x N columns), or a folder (a path without suffix) of database.npy, queries.npy, ids and config.json"
)


class _Without:
    """A parser seen through a filter: ``add_argument`` skips the options named in ``skip`` and
    records their defaults instead (so ``cli.run._config`` still finds every attribute)."""

    def __init__(self, target: Any, skip: Iterable[str], root: argparse.ArgumentParser | None = None) -> None:
        self._target, self._skip, self._root = target, frozenset(skip), root or target

    def add_argument(self, *names: str, **kw: Any) -> Any:
        if any(n in self._skip for n in names):
            dest = kw.get("dest") or names[0].lstrip("-").replace("-", "_")
            self._root.set_defaults(**{dest: kw.get("default")})
            return None
        return self._target.add_argument(*names, **kw)

    def add_argument_group(self, *args: Any, **kw: Any) -> _Without:
        return _Without(self._target.add_argument_group(*args, **kw), self._skip, self._root)

    def add_mutually_exclusive_group(self, *args: Any, **kw: Any) -> _Without:
        return _Without(self._target.add_mutually_exclusive_group(*args, **kw), self._skip, self._root)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def _extract_args(p: argparse.ArgumentParser) -> None:
    from .run import _run_args

    _run_args(_Without(p, _NOT_FOR_EXTRACT))  # type: ignore[arg-type]
    p.add_argument("--out", required=True, metavar="FILE", help=_OUT_HELP)


@command(
    "extract",
    args=_extract_args,
    order=1,
    help="write database and query descriptors to a file (.npz, .h5, .mat or a folder)",
    description="Extract the descriptors 'retrbench run' would post-process (pooled; not L2-normalised, not "
    "whitened; an ensemble's L2-normalised parts concatenated) with the image ids (dataset order; queries in "
    "ground-truth order) and a JSON config (run options, weights sha256, image size used, retrbench version). "
    "Whitening, reranking and --topk act later: 'retrbench evaluate --features'.",
    examples=(
        "retrbench extract --model efficientnet_lite0 --dataset demo --pooling gem --out demo.npz",
        "retrbench extract --model simclr2x --dataset roxford5k --pooling rmac --bn-recalibrate 5000 --out rox.h5",
        "retrbench extract --model efficientnet_lite0 --dataset rparis6k --out rpar.npz   # a whitening set",
    ),
)
def cmd_extract(a: argparse.Namespace) -> int:
    from .run import _config

    cfg = _config(a)
    _check_output(a.out)
    from ..exchange import extract

    desc = extract(cfg, progress=not a.no_progress and sys.stderr.isatty())
    path = desc.save(a.out)
    n, d = desc.database.shape
    print(f"{cfg.model} on {cfg.dataset}: wrote {path} (database {n} x {d}, queries {desc.queries.shape[0]} x {d}; pooled, not whitened)")
    return 0


def _check_output(path: str) -> None:
    """Refuse an output the writers cannot produce before anything is extracted."""
    from ..descriptors import descriptor_format

    try:
        fmt = descriptor_format(path)
    except ValueError as e:
        raise UsageError(f"--out {e}") from None
    if fmt == "h5":
        try:
            import h5py  # noqa: F401
        except ImportError:
            raise UsageError(f"--out {path}: HDF5 files need h5py (pip install 'retrbench[h5]'); or write .npz") from None
    p = Path(path)
    if fmt != "npy" and p.is_dir():
        raise UsageError(f"--out {path} is a folder; give a file name (or a path without suffix for the folder layout)")


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    from ..evaluation import PROTOCOLS
    from .run import _whiten

    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ranks", help=".npy integer array (queries, database), one row per query, best first")
    source.add_argument(
        "--features",
        metavar="FILE",
        help="descriptors from any tool: .npz / .h5 / folder with 'database' (N, D) and 'queries' (Q, D) rows, or "
        "revisitop's .mat (X, Q as D x N columns); rows are matched to the gnd's imlist / qimlist by their ids "
        "when the file has ids, else by position",
    )
    p.add_argument("--gnd", required=True, help="ground-truth pickle (gnd_*.pkl: imlist, qimlist, gnd)")
    p.add_argument("--protocol", default="revisited", choices=PROTOCOLS.list(), help="; ".join(f"{e.name}: {e.help}" for e in PROTOCOLS) + " (default %(default)s)")
    p.add_argument("--whiten", type=_whiten, default=None, metavar="D", help="with --features: PCA-whitening to D dimensions, learned on --whiten-features or else on the database (default none)")
    p.add_argument("--whiten-features", metavar="FILE", default=None, help="with --features: descriptor file whose database the whitening is learned on (e.g. 'retrbench extract' on another dataset)")
    p.add_argument("--rerank", default=None, help="with --features: rerank steps joined by '+' (dba+aqe), each NAME[:key=value,...] (default none)")
    p.add_argument("--topk", type=int, default=None, help="with --features: ranking length kept per query (default: the protocol's rule, as run)")
    p.add_argument("--kappas", default="1,5,10", help="k values of mP@k (default %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the metrics to this JSON file")
    p.add_argument("--format", choices=FORMATS, default="markdown", help="(default %(default)s)")


@command(
    "evaluate",
    args=_evaluate_args,
    order=2,
    help="evaluate your own rankings or descriptor files against a ground-truth file",
    description="--ranks: metrics of a ranking. --features: L2 -> (PCA-whitening -> L2) -> search -> rerank -> "
    "metrics on descriptors from any tool, the code 'retrbench run' runs after extraction.",
    examples=(
        "retrbench evaluate --ranks ranks.npy --gnd gnd_roxford5k.pkl --protocol revisited --json out.json",
        "retrbench evaluate --features rox.npz --gnd gnd_roxford5k.pkl --whiten 512 --whiten-features rpar.npz --rerank aqe",
        "retrbench evaluate --features roxford5k_resnet_rsfm120k_gem.mat --gnd gnd_roxford5k.pkl --json out.json",
    ),
)
def cmd_evaluate(a: argparse.Namespace) -> int:
    try:
        kappas = tuple(int(k) for k in a.kappas.split(",") if k.strip())
    except ValueError:
        raise UsageError(f"--kappas takes comma-separated integers, got {a.kappas!r}") from None
    if a.ranks is not None:
        given = [f"--{o.replace('_', '-')}" for o in _FEATURE_OPTIONS if getattr(a, o) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} act on descriptors: use them with --features, not --ranks")
        return _evaluate_ranks(a, kappas)
    return _evaluate_features(a, kappas)


def _print_metrics(df: Any, label: str, index: str, fmt: str) -> None:
    import pandas as pd

    from ..utils.render import render

    wide = df.assign(col=lambda t: (t.split.where(t.split != "all", "").str.capitalize() + " " + t.metric).str.strip())
    wide = wide.set_index("col")["value"].to_frame().T
    wide.index = pd.Index([label], name=index)
    print(render(wide, fmt))


def _evaluate_ranks(a: argparse.Namespace, kappas: tuple[int, ...]) -> int:
    import numpy as np
    import pandas as pd

    from ..datasets import load_gnd_pickle
    from ..evaluation import evaluate, gnd_from_pickle
    from ..results import warn_undefined_metrics

    try:
        ranks = np.load(a.ranks, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise OSError(f"cannot read --ranks {a.ranks}: {e}") from None
    data = load_gnd_pickle(a.gnd)
    gnd = gnd_from_pickle(data, a.protocol)
    metrics = evaluate(ranks, gnd, a.protocol, kappas=kappas, n_database=len(data["imlist"]))
    warn_undefined_metrics(metrics, Path(a.gnd).name)
    df = pd.DataFrame([{"split": m.split, "metric": m.name, "value": m.value} for m in metrics])
    if a.json:
        _write_json(a.json, {"ranks": a.ranks, "gnd": a.gnd, "protocol": a.protocol, "metrics": df.to_dict("records")})
    _print_metrics(df, Path(a.ranks).name, "ranks", a.format)
    return 0


def _evaluate_features(a: argparse.Namespace, kappas: tuple[int, ...]) -> int:
    import warnings

    from ..exchange import evaluate_descriptors
    from ..pipeline import WhiteningNote
    from ..rerank import build_reranker

    if a.whiten_features is not None and a.whiten is None:
        raise UsageError("--whiten-features is the whitening's training set: give --whiten D too")
    if a.topk is not None and a.topk < 1:
        raise UsageError(f"--topk must be >= 1, got {a.topk}")
    rerank = a.rerank or "none"
    try:
        build_reranker(rerank)
    except (KeyError, ValueError) as e:
        raise UsageError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WhiteningNote)  # printed below as a note
        res = evaluate_descriptors(
            a.features, a.gnd, a.protocol, whiten=a.whiten, whiten_features=a.whiten_features, rerank=rerank, topk=a.topk, kappas=kappas
        )
    df = res.metrics[["split", "metric", "value"]]
    if a.json:
        payload = {
            "features": a.features,
            "gnd": a.gnd,
            "protocol": a.protocol,
            "whiten": a.whiten,
            "whiten_features": a.whiten_features,
            "rerank": rerank,
            "topk": a.topk,
            "metrics": df.to_dict("records"),
            "rows": res.rows,
            "info": res.info,
        }
        _write_json(a.json, payload)
    _print_metrics(df, Path(a.features).name, "features", a.format)
    note = res.info.get("whitening", {}).get("note")
    if note:
        print(f"note: {note}", file=sys.stderr)
    return 0
