"""``retrbench sweep | table | plot``: experiments and reports.

Handlers only turn arguments into calls of :mod:`retrbench.experiments` and
:mod:`retrbench.reporting` and print what those return.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .main import UsageError, command


def _where(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for text in items:
        key, eq, value = text.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--where expects KEY=VALUE (e.g. whiten=512), got {text!r}")
        parsed = [yaml.safe_load(v) for v in value.split(",")] if "," in value else yaml.safe_load(value)
        out[key.strip()] = parsed
    return out


def _load(path: str):
    """Tidy rows from a results file / directory, or from one of the paper's CSV tables."""
    if path.lower().endswith(".csv"):
        from ..reporting import paper_table

        return paper_table(path)
    from ..results import load_results

    return load_results(path)


def _sweep_args(s: argparse.ArgumentParser) -> None:
    from ..reporting import FORMATS as _FORMATS
    from ..reporting import LAYOUTS as _LAYOUTS

    s.add_argument("file", help="experiment file (YAML), e.g. benchmarks/demo.yaml")
    s.add_argument("--results-dir", default=None, help="where results.jsonl goes (default: the file's results_dir, else results/<name>)")
    s.add_argument("--dry-run", action="store_true", help="list the cells and whether each is done; run nothing")
    s.add_argument("--layout", choices=_LAYOUTS, default=None, help="print the results in this layout when done")
    s.add_argument("--format", choices=_FORMATS, default="markdown", help="format of --layout (default %(default)s)")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")


def _table_args(t: argparse.ArgumentParser) -> None:
    from ..reporting import FORMATS as _FORMATS
    from ..reporting import LAYOUTS as _LAYOUTS

    t.add_argument("results", help="results.jsonl, the directory holding it, or one of the paper's CSV tables")
    t.add_argument("--layout", choices=_LAYOUTS, default="table1", help="table1: rerank variants; table2: Easy/Medium/Hard; table3: dimensions; long (default %(default)s)")
    t.add_argument("--format", choices=_FORMATS, default="markdown", help="(default %(default)s)")
    t.add_argument("--where", action="append", default=[], metavar="KEY=VALUE", help="keep rows with this setting, e.g. whiten=512 or pooling=gem,rmac (repeatable)")
    t.add_argument("--metric", default=None, help="value of table1 / table3 (default mAP)")
    t.add_argument("--split", default=None, help="split of table1 / table3 (default: all, else medium)")
    t.add_argument("--precision", type=int, default=2)
    t.add_argument("--caption", default=None, help="LaTeX: wrap the tabular in a table with this caption")
    t.add_argument("--out", default=None, help="write to this file instead of printing")


def _plot_args(p: argparse.ArgumentParser) -> None:
    from ..reporting import PLOT_KINDS

    p.add_argument("results", help="results.jsonl, the directory holding it, or one of the paper's CSV tables")
    p.add_argument("--kind", choices=PLOT_KINDS, default="dims")
    p.add_argument("--out", default="plots", help="output directory (default %(default)s)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE", help="keep rows with this setting (repeatable)")


@command(
    "sweep",
    args=_sweep_args,
    order=20,
    help="run every cell of an experiment file (skips cells already in the results)",
    examples=("retrbench sweep benchmarks/demo.yaml --dry-run", "retrbench sweep benchmarks/demo.yaml --layout table1"),
)
def cmd_sweep(a: argparse.Namespace) -> int:
    from ..experiments import load_experiment, plan, sweep
    from ..reporting import table

    try:
        exp = load_experiment(a.file)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise UsageError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from e
    if a.dry_run:
        cells = plan(exp, results_dir=a.results_dir)
        print(cells.drop(columns="config_id").to_markdown(index=False))
        print(f"\n{len(cells)} cells, {int(cells['done'].sum())} done", file=sys.stderr)
        return 0
    df = sweep(exp, results_dir=a.results_dir, progress=not a.no_progress and sys.stderr.isatty())
    info = df.attrs["sweep"]
    for note in info["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if a.layout and len(df):
        print(table(df, a.layout, a.format))
    print(
        f"sweep {info['name']}: {info['cells']} cells, {info['skipped']} already done, {info['ran']} run "
        f"in {info['seconds']:.1f} s; results in {info['results_dir']}",
        file=sys.stderr,
    )
    return 0


@command(
    "table",
    args=_table_args,
    order=21,
    help="the paper's table layouts from a results file or directory",
    examples=("retrbench table results/demo --layout table1 --format latex", "retrbench table results --layout table2 --where whiten=512"),
)
def cmd_table(a: argparse.Namespace) -> int:
    from ..reporting import notes, table

    df = _load(a.results)
    text = table(df, a.layout, a.format, precision=a.precision, metric=a.metric, split=a.split, where=_where(a.where), caption=a.caption)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")
        print(f"wrote {a.out}", file=sys.stderr)
    else:
        print(text)
    for note in notes(df):
        print(f"note: {note}", file=sys.stderr)
    return 0


@command(
    "plot",
    args=_plot_args,
    order=22,
    help="mAP against whitening dimension (dims) or rerank variants (rerank), PNG and PDF",
    examples=("retrbench plot results/demo --kind dims --out plots/",),
)
def cmd_plot(a: argparse.Namespace) -> int:
    from ..reporting import plot

    paths = plot(_load(a.results), a.kind, a.out, where=_where(a.where))
    for p in paths:
        print(p)
    return 0
