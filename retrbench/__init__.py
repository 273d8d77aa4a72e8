"""retrbench: benchmark frozen neural networks for instance-level image retrieval.

    import retrbench as rb
    result = rb.run(model="efficientnet_lite0", dataset="demo", pooling="gem", whiten=None)
    result.metrics   # pandas DataFrame

Attributes are imported on first use (PEP 562), so ``import retrbench`` and ``retrbench
--help`` do not load torch, faiss or pandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "BACKBONES": "retrbench.backbones",
    "DATASETS": "retrbench.datasets",
    "Descriptors": "retrbench.descriptors",
    "POOLINGS": "retrbench.pooling",
    "PROTOCOLS": "retrbench.evaluation",
    "RERANKERS": "retrbench.rerank",
    "Features": "retrbench.types",
    "Metric": "retrbench.types",
    "ModelRef": "retrbench.specs",
    "Pipeline": "retrbench.specs",
    "Query": "retrbench.types",
    "RetrievalDataset": "retrbench.types",
    "RunConfig": "retrbench.config",
    "RunResult": "retrbench.results",
    "SearchResult": "retrbench.types",
    "Step": "retrbench.specs",
    "evaluate": "retrbench.evaluation",
    "evaluate_descriptors": "retrbench.exchange",
    "evaluate_features": "retrbench.pipeline",
    "extract": "retrbench.exchange",
    "load_dataset": "retrbench.datasets",
    "load_descriptors": "retrbench.descriptors",
    "load_experiment": "retrbench.experiments",
    "load_results": "retrbench.results",
    "paper_table": "retrbench.reporting",
    "plot": "retrbench.reporting",
    "run": "retrbench.pipeline",
    "sweep": "retrbench.experiments",
    "table": "retrbench.reporting",
}

__all__ = [
    "__version__",
    "BACKBONES",
    "DATASETS",
    "Descriptors",
    "Features",
    "Metric",
    "ModelRef",
    "POOLINGS",
    "PROTOCOLS",
    "Pipeline",
    "Query",
    "RERANKERS",
    "RetrievalDataset",
    "RunConfig",
    "RunResult",
    "SearchResult",
    "Step",
    "evaluate",
    "evaluate_descriptors",
    "evaluate_features",
    "extract",
    "load_dataset",
    "load_descriptors",
    "load_experiment",
    "load_results",
    "paper_table",
    "plot",
    "run",
    "sweep",
    "table",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retrbench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover
    from .backbones import BACKBONES
    from .config import RunConfig
    from .datasets import DATASETS, load_dataset
    from .descriptors import Descriptors, load_descriptors
    from .evaluation import PROTOCOLS, evaluate
    from .exchange import evaluate_descriptors, extract
    from .experiments import load_experiment, sweep
    from .pipeline import evaluate_features, run
    from .pooling import POOLINGS
    from .reporting import paper_table, plot, table
    from .rerank import RERANKERS
    from .results import RunResult, load_results
    from .specs import ModelRef, Pipeline, Step
    from .types import Features, Metric, Query, RetrievalDataset, SearchResult
