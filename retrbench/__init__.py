"""retrbench: benchmark frozen neural networks for instance-level image retrieval.

    import retrbench as rb
    result = rb.run(model="efficientnet_lite0", dataset="demo", pooling="rmac", whiten=512)
    result.metrics   # pandas DataFrame
"""

__version__ = "0.1.0"

from .backbones import BACKBONES  # noqa: E402
from .config import RunConfig  # noqa: E402
from .datasets import DATASETS  # noqa: E402
from .evaluation import PROTOCOLS, evaluate  # noqa: E402
from .experiments import load_experiment, sweep  # noqa: E402
from .pipeline import load_dataset, run  # noqa: E402
from .pooling import POOLINGS  # noqa: E402
from .reporting import paper_table, plot, table  # noqa: E402
from .rerank import RERANKERS  # noqa: E402
from .results import RunResult, load_results  # noqa: E402
from .types import Features, Metric, Query, RetrievalDataset, SearchResult  # noqa: E402

__all__ = [
    "BACKBONES",
    "DATASETS",
    "POOLINGS",
    "PROTOCOLS",
    "RERANKERS",
    "Features",
    "Metric",
    "Query",
    "RetrievalDataset",
    "RunConfig",
    "RunResult",
    "SearchResult",
    "evaluate",
    "load_dataset",
    "load_experiment",
    "paper_table",
    "plot",
    "sweep",
    "table",
    "load_results",
    "run",
]
