"""The paper's tables and figures from tidy results.

:func:`table` pivots tidy rows (:func:`retrbench.results.load_results`, :func:`retrbench.sweep`)
into the layouts of Krishna et al. (ICMR 2021), datasets as row groups and methods as rows
(``table1`` rerank variants, ``table2`` Easy/Medium/Hard, ``table3`` whitening dimensions,
``long``), rendered as ``latex`` (booktabs, multirow dataset groups, best value of each column
per dataset in bold; needs ``\\usepackage{booktabs,multirow}``), ``markdown``, ``csv`` (the
header of the paper's CSV files) or ``html`` (renders in Jupyter).
:func:`paper_table` reads the paper's tables (``../shared/paper/*.csv``) back into tidy rows,
so the paper and your own runs go through the same code; :func:`plot` draws the dimension
sweep and the rerank comparison (PNG and PDF).

Modules: :mod:`.tables` (layouts), :mod:`.labels` (display names, from the rows or the
registries), :mod:`.paper` (the paper's CSV tables), :mod:`.plots` (figures); rendering is
:func:`retrbench.utils.render.render`. Importing this package loads pandas only: no stage,
no torch, no matplotlib until a plot is drawn.
"""

from __future__ import annotations

from .labels import LABEL_COLUMNS, dataset_label, label_column, model_label, pooling_label, rerank_label
from .paper import PAPER_DATASETS, PAPER_MODELS, paper_table
from .plots import PLOT_KINDS, plot
from .tables import FORMATS, LAYOUTS, notes, table, table_frame

__all__ = [
    "FORMATS",
    "LABEL_COLUMNS",
    "LAYOUTS",
    "PAPER_DATASETS",
    "PAPER_MODELS",
    "PLOT_KINDS",
    "dataset_label",
    "label_column",
    "model_label",
    "notes",
    "paper_table",
    "plot",
    "pooling_label",
    "rerank_label",
    "table",
    "table_frame",
]
