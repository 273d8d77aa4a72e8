"""Display names (retrbench/reporting/labels.py): the row's label, else the registry's."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from retrbench.reporting import dataset_label, label_column, model_label, pooling_label, rerank_label, table_frame

from .helpers import frame


def test_model_labels_come_from_the_backbone_registry():
    from retrbench.backbones import BACKBONES

    for entry in BACKBONES:
        assert model_label(entry.name) == entry.label
        for alias in entry.aliases:  # moco_v2, simclr-4x, ... are named like their entry
            assert model_label(alias) == entry.label
    names = BACKBONES.list()[:2]
    assert model_label("+".join(names)) == "+".join(BACKBONES.label(n) for n in names)
    assert model_label("timm:vit_small") == "timm:vit_small"  # resolved names stay as written
    assert model_label("mine", {"MINE": "Ours"}) == "Ours"


def test_dataset_pooling_rerank_labels_come_from_their_registries():
    from retrbench.datasets import DATASETS
    from retrbench.pooling import POOLINGS
    from retrbench.rerank import pipeline_label

    assert [dataset_label(e.name) for e in DATASETS] == [e.label for e in DATASETS]
    assert dataset_label("folder:/data/photos") == "photos"
    assert pooling_label("gem:p=4") == f"{POOLINGS.label('gem')}(p=4)"
    assert pooling_label("RMAC") == POOLINGS.label("rmac")
    assert pooling_label(None) == "?" and pooling_label(float("nan")) == "?"
    for spec in ("none", "dba+aqe+dfs", "aqe:k=5"):
        assert rerank_label(spec) == pipeline_label(spec)
    assert rerank_label(None) == pipeline_label("none")
    assert rerank_label("aqe:k") == "aqe:k"  # does not parse: shown as written


def test_a_rows_label_wins_and_missing_labels_fall_back_to_the_registry():
    df = pd.DataFrame(
        {
            "model": ["resnet50", "resnet50", "simclr2x+simclr4x"],
            "model_label": ["Mine", np.nan, None],
            "dataset": ["roxford5k", "oxford5k", "demo"],
        }
    )
    assert list(label_column(df, "model")) == ["Mine", model_label("resnet50"), model_label("simclr2x+simclr4x")]
    assert list(label_column(df, "dataset")) == [dataset_label(d) for d in df.dataset]  # no label column at all
    assert list(label_column(df, "model", {"resnet50": "R"})) == ["R", "R", model_label("simclr2x+simclr4x")]
    with pytest.raises(ValueError, match="no display names"):
        label_column(df, "split")


def test_rows_without_labels_render_like_labelled_rows():
    """An older results file (no ``*_label`` columns) gives the same tables as a new one, as
    long as the registries name things as the run did."""
    new = frame()
    old = frame(labels=False)
    for layout in ("table1", "table2", "table3", "long"):
        pd.testing.assert_frame_equal(table_frame(old, layout), table_frame(new, layout))


def test_labelled_rows_render_without_importing_torch():
    code = (
        "import sys, pandas as pd\n"
        "sys.path.insert(0, 'tests')\n"
        "from reporting.helpers import frame\n"
        "from retrbench.reporting import table\n"
        "for layout in ('table1', 'table2', 'table3', 'long'):\n"
        "    for fmt in ('markdown', 'latex', 'csv', 'html'):\n"
        "        table(frame(), layout, fmt)\n"
        "heavy = sorted(m for m in ('torch', 'faiss', 'matplotlib', 'retrbench.backbones', 'retrbench.datasets', 'retrbench.pooling') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parents[2]))
    assert out.returncode == 0, out.stderr
