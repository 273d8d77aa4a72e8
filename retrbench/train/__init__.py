"""Self-supervised fine-tuning for instance retrieval: InsCLR (Deng et al., AAAI 2022).

One module per step of the method:

=================  ==========================================================================
``candidates``     step 1: each image's top-K neighbours under the current model (faiss), cached
``tuples``         step 2: training tuples (anchor + top-k) and batches of disjoint tuples
``memory``         step 3: cross-batch memory (augmented, XBM) and the dataset bank (un-augmented)
``mining``         steps 4-5: mini-batch selection and iterative pseudo-positive mining
``loss``           step 6: XBM's contrastive loss with margin, batch + memory
``config``         :class:`InsCLRConfig`, every field of a run, validated
``views``          augmented and un-augmented views of the training images
``network``        the embedding ``L2(GeM_p(backbone(x)))``, trainable parameters, modes
``checkpoint``     the run directory: checkpoints, ``state.pth``, resuming
``report``         ``log.csv``, ``training.png``, per-stage summaries, measurement labels
``loop``           steps 7-8: :func:`train`, the staged loop and one training step
``cli``            ``retrbench train insclr ...``
=================  ==========================================================================

``from retrbench.train import InsCLRConfig, train`` (names are loaded on first use, so that the
command line does not import torch-heavy modules just to build its parser).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "LOG_COLUMNS",
    "CandidateSets",
    "CrossBatchMemory",
    "DatasetBank",
    "InsCLRConfig",
    "Selection",
    "TrainResult",
    "TupleSampler",
    "candidate_sets",
    "contrastive_loss",
    "default_trainable",
    "embed",
    "insclr_loss",
    "insclr_state_dict",
    "make_tuple",
    "mine",
    "mine_positives",
    "plot_log",
    "sample_tuples",
    "select",
    "train",
    "true_labels",
    "tuple_candidate_set",
]

_WHERE = {
    "CandidateSets": "candidates",
    "candidate_sets": "candidates",
    "make_tuple": "tuples",
    "sample_tuples": "tuples",
    "tuple_candidate_set": "tuples",
    "TupleSampler": "tuples",
    "CrossBatchMemory": "memory",
    "DatasetBank": "memory",
    "Selection": "mining",
    "select": "mining",
    "mine": "mining",
    "mine_positives": "mining",
    "contrastive_loss": "loss",
    "insclr_loss": "loss",
    "InsCLRConfig": "config",
    "default_trainable": "network",
    "embed": "network",
    "insclr_state_dict": "checkpoint",
    "LOG_COLUMNS": "report",
    "plot_log": "report",
    "true_labels": "report",
    "TrainResult": "loop",
    "train": "loop",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
