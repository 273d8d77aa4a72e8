"""The one place where the stages meet: dataset -> backbone -> extraction -> whitening ->
search -> rerank -> evaluation -> tidy results. The CLI and notebooks both call :func:`run`.

:mod:`.features` is the extraction half (:func:`extract_features`, cached descriptors of a run's
dataset and models), :mod:`.run` the evaluation half (:func:`evaluate_features`, also used on
descriptor files) and :func:`run` itself. Every stage is built from the registries before
anything is extracted (:func:`check_config`), so a misspelt pooling or reranker fails in a
second instead of after the extraction.
"""

from .features import BN_SEED, DatasetFeatures, check_config, dataset_features, extract_features
from .run import Evaluation, WhiteningNote, evaluate_features, run

__all__ = [
    "BN_SEED",
    "DatasetFeatures",
    "Evaluation",
    "WhiteningNote",
    "check_config",
    "dataset_features",
    "evaluate_features",
    "extract_features",
    "run",
]
