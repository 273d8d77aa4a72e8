"""Evaluation stage: rankings + ground truth -> metrics, exactly as the reference code computes them.

:mod:`.core` holds the vectorised AP / P@k (identical to revisitop's ``compute_map``, see its
docstring for every convention); :mod:`.checks` the ranking validation (:func:`check_ranks`:
no id twice in a row, none beyond the database); :mod:`.protocols` the :data:`PROTOCOLS`
registry and :func:`evaluate`; :mod:`.scores` the exact evaluation of a full ranking defined by
scores (:func:`exact_evaluation`, :func:`evaluate_scores`), without sorting the database. A new
protocol is one function registered in :data:`PROTOCOLS`.
"""

from .checks import check_ranks
from .core import Gnd, MapResult, average_precision, check_gnd_range, compute_map
from .protocols import (
    PROTOCOLS,
    ProtocolInfo,
    evaluate,
    gldv2_protocol,
    gnd_from_pickle,
    map_at_k,
    per_query_ap,
    precision_at_k,
)
from .scores import ExactEvaluation, evaluate_scores, exact_evaluation, full_ranking_positions

__all__ = [
    "ExactEvaluation",
    "Gnd",
    "MapResult",
    "PROTOCOLS",
    "ProtocolInfo",
    "average_precision",
    "check_gnd_range",
    "check_ranks",
    "compute_map",
    "evaluate",
    "evaluate_scores",
    "exact_evaluation",
    "full_ranking_positions",
    "gldv2_protocol",
    "gnd_from_pickle",
    "map_at_k",
    "per_query_ap",
    "precision_at_k",
]
