"""``retrbench models`` and ``retrbench datasets``: the registries, as tables."""

from __future__ import annotations

import argparse
from pathlib import Path

from .main import command


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", default="*", help="glob on the names, e.g. 'simclr*' (default: all)")


@command("models", args=_models_args, order=10, help="list the backbone registry and where each model's weights are", examples=("retrbench models", "retrbench models 'moco*'"))
def cmd_models(a: argparse.Namespace) -> int:
    import pandas as pd

    from ..backbones import BACKBONES, local_weights

    rows = []
    for name in BACKBONES.list(a.pattern):
        e = BACKBONES.get(name)
        info = e.info
        if not info.weights_file and info.find_local is None:
            here = "n/a (no weights)"
        else:
            found = local_weights(e.name)
            here = str(found) if found else "not here (downloaded on first use)" if info.url else "not here (pass --weights)"
        rows.append(
            {
                "name": e.name,
                "label": e.label,
                "aliases": ", ".join(e.aliases),
                "channels": info.channels,
                "stride": info.stride,
                "patch": getattr(info, "patch_size", None) or "",
                "size": info.default_size,
                "weights": info.weights_source,
                "weights here": here,
                "about": e.help,
            }
        )
    print(pd.DataFrame(rows).to_markdown(index=False))
    for r in BACKBONES.resolvers:
        print(f"\n{r.prefix or '(file)'}... {r.help}")
    return 0


def _datasets_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, help="where datasets live (default $RETRBENCH_DATA or ~/.cache/retrbench/data)")


@command("datasets", args=_datasets_args, order=11, help="list the known datasets, their protocol and where they are expected", examples=("retrbench datasets --data-root /data",))
def cmd_datasets(a: argparse.Namespace) -> int:
    import pandas as pd

    from ..datasets import DATASETS
    from ..utils.paths import default_data_root

    root = Path(a.data_root) if a.data_root else default_data_root()
    rows = [
        {
            "name": e.name,
            "label": e.label,
            "aliases": ", ".join(e.aliases),
            "protocol": e.info.protocol,
            "expected at": e.info.layout.replace("<data_root>", str(root)),
            "about": e.help,
        }
        for e in DATASETS
    ]
    rows += [{"name": f"{r.prefix}PATH", "label": "", "aliases": "", "protocol": "", "expected at": "PATH", "about": r.help} for r in DATASETS.resolvers]
    print(pd.DataFrame(rows).to_markdown(index=False))
    return 0
