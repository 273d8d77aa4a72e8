"""``retrbench evaluate``: metrics of rankings (or, soon, descriptor files) against ground truth."""

from __future__ import annotations

import argparse
from pathlib import Path

from .main import UsageError, command
from .run import FORMATS, _write_json


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    from ..evaluation import PROTOCOLS

    p.add_argument("--ranks", required=True, help=".npy integer array (queries, database), one row per query, best first")
    p.add_argument("--gnd", required=True, help="ground-truth pickle (gnd_*.pkl: imlist, qimlist, gnd)")
    p.add_argument("--protocol", default="revisited", choices=PROTOCOLS.list(), help="; ".join(f"{e.name}: {e.help}" for e in PROTOCOLS) + " (default %(default)s)")
    p.add_argument("--kappas", default="1,5,10", help="k values of mP@k (default %(default)s)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the metrics to this JSON file")
    p.add_argument("--format", choices=FORMATS, default="markdown", help="(default %(default)s)")


@command(
    "evaluate",
    args=_evaluate_args,
    order=1,
    help="evaluate your own rankings against a ground-truth file",
    examples=("retrbench evaluate --ranks ranks.npy --gnd gnd_roxford5k.pkl --protocol revisited --json out.json",),
)
def cmd_evaluate(a: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd

    from ..datasets import load_gnd_pickle
    from ..evaluation import evaluate, gnd_from_pickle
    from ..results import warn_undefined_metrics
    from ..utils.render import render

    try:
        kappas = tuple(int(k) for k in a.kappas.split(",") if k.strip())
    except ValueError:
        raise UsageError(f"--kappas takes comma-separated integers, got {a.kappas!r}") from None
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
    wide = df.assign(col=lambda t: (t.split.where(t.split != "all", "").str.capitalize() + " " + t.metric).str.strip())
    wide = wide.set_index("col")["value"].to_frame().T
    wide.index = pd.Index([Path(a.ranks).name], name="ranks")
    print(render(wide, a.format))
    return 0
