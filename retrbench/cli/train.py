"""``retrbench train insclr --model NAME --dataset NAME_OR_FOLDER --out DIR [--config FILE]``.

The ``train`` command's parser gets one sub-parser per method (``insclr``); the handler builds
an :class:`~retrbench.train.config.InsCLRConfig` (defaults < ``--config`` YAML < flags given on
the command line), calls :func:`~retrbench.train.loop.train` and prints where the checkpoint,
log and plot are. Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .main import command

__all__ = ["add_method_parsers", "build_config", "run_train_command"]

# flag -> (config field, type, help); None default = "not given" (the YAML or the default applies)
_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--model", "model", str, "backbone registry name (default efficientnet_lite0)"),
    ("--weights", "weights", str, "checkpoint to start from (default: the entry's weights)"),
    ("--dataset", "dataset", str, "training collection: dataset name or folder:PATH (its database images; labels unused)"),
    ("--data-root", "data_root", str, "where datasets live (default $RETRBENCH_DATA)"),
    ("--image-size", "image_size", int, "training resolution (crop side; longer side of un-augmented views)"),
    ("--candidates-k", "candidates_k", int, "candidate-set size K"),
    ("--tuple-k", "tuple_k", int, "tuple = anchor + top-k of its candidate set"),
    ("--tuples-per-batch", "tuples_per_batch", int, "tuples per step"),
    ("--tuple-separation", "tuple_separation", int, "tuples of a batch avoid each other's top-N candidates (0: only disjoint)"),
    ("--selection-threshold", "selection_threshold", float, "mini-batch selection: keep members at least this similar to the anchor"),
    ("--mining-rounds", "mining_rounds", int, "pseudo-positive mining rounds (0: none)"),
    ("--mining-first-k", "mining_first_k", int, "positives mined in the first round (then x growth per round)"),
    ("--mining-min-sim", "mining_min_sim", float, "similarities below this are ignored by the mining scores"),
    ("--margin", "margin", float, "contrastive-loss margin for negatives"),
    ("--memory-size", "memory_size", int, "cross-batch memory entries (default: the collection size)"),
    ("--memory-init", "memory_init", str, "descriptors | augmented | none"),
    ("--trainable", "trainable", str, "regex of the parameter names to fine-tune (default: the last stages)"),
    ("--device", "device", str, "auto (GPU when present), cpu, cuda ..."),
    ("--workers", "workers", int, "image-loading processes"),
    ("--checkpoint-every", "checkpoint_every", int, "steps between checkpoints"),
    ("--seed", "seed", int, "random seed"),
]


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_method_parsers(train: argparse.ArgumentParser) -> None:
    """Add the training methods to the ``train`` parser: ``retrbench train insclr ...``.

    The parsed namespace carries ``method`` (``insclr``) and the method's flags, for
    :func:`run_train_command`.
    """
    methods = train.add_subparsers(dest="method", required=True)
    p = methods.add_parser(
        "insclr",
        help="InsCLR (Deng et al. 2022): candidate sets, tuple selection, pseudo-positive mining, XBM loss",
        description="Fine-tune with InsCLR; resumes when --out already holds the same run. Writes OUT/last.pth "
        "(for `retrbench run --model NAME --weights OUT/last.pth`), OUT/log.csv and OUT/training.png.",
    )
    p.add_argument("--out", required=True, help="output directory (checkpoints, log, plot, caches)")
    p.add_argument("--config", default=None, help="YAML file of InsCLRConfig fields (flags override it)")
    for flag, dest, typ, help_ in _FLAGS:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_)
    p.add_argument("--stages", type=_ints, default=None, help="steps per stage, comma-separated (e.g. 200,200)")
    p.add_argument("--lr", type=_floats, default=None, help="learning rate per stage, comma-separated (one value: all stages)")
    p.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="no mixed precision on GPU")
    p.add_argument("--no-memory-negatives", dest="memory_negatives", action="store_false", default=None, help="the memory term uses only pseudo-positives (InsCLR's INSTRE setting)")
    p.add_argument("--measure-labels", action="store_true", help="log the true precision of tuples and mined positives from the dataset's ground truth (measurement only; training never uses labels)")
    p.add_argument("--restart", action="store_true", help="start over instead of resuming a run found in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_config(a: argparse.Namespace) -> Any:
    """The :class:`InsCLRConfig` of parsed arguments: defaults, then ``--config``, then flags."""
    from ..train.config import InsCLRConfig

    base = InsCLRConfig.from_yaml(a.config).to_dict() if a.config else {}
    names = [dest for _, dest, _, _ in _FLAGS] + ["stages", "lr", "amp", "memory_negatives"]
    given = {k: getattr(a, k) for k in names if getattr(a, k, None) is not None}
    return InsCLRConfig.from_dict({**base, **given})


def run_train_command(a: argparse.Namespace) -> int:
    """Handler of ``retrbench train insclr``; prints the outputs, returns the exit status."""
    from ..train.loop import train
    from ..train.report import true_labels

    cfg = build_config(a)
    labels = None
    if a.measure_labels:
        from ..datasets import load_dataset

        labels = true_labels(load_dataset(cfg.dataset, cfg.data_root))
    res = train(cfg, a.out, eval_labels=labels, restart=a.restart, progress=not a.no_progress and sys.stderr.isatty())
    if res.stages:
        import pandas as pd

        print(pd.DataFrame(res.stages).round(3).to_markdown(index=False))
    print(f"\ncheckpoint: {res.last}  (retrbench run --model {cfg.model} --weights {res.last})")
    if res.insclr_checkpoint is not None:
        print(f"InsCLR layout: {res.insclr_checkpoint}")
    print(f"log: {res.log}\nplot: {res.plot}\nthroughput: {res.images_per_s:.2f} images/s")
    return 0


@command(
    "train",
    args=add_method_parsers,
    order=40,
    help="fine-tune a backbone on an unlabelled collection (self-supervised InsCLR)",
    examples=(
        "retrbench train insclr --model efficientnet_lite0 --dataset coil20 --image-size 128 --out runs/coil20",
        "retrbench run --model efficientnet_lite0 --weights runs/coil20/last.pth --dataset coil20 --whiten none",
    ),
)
def cmd_train(a: argparse.Namespace) -> int:
    return run_train_command(a)
