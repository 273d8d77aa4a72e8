"""The extension examples of ARCHITECTURE.md work as written: each code block is executed, and
the four new entries then run together through the real pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import retrbench as rb

DOC = Path(__file__).resolve().parents[1] / "ARCHITECTURE.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


@pytest.fixture
def examples():
    from retrbench.backbones import BACKBONES
    from retrbench.datasets import DATASETS
    from retrbench.pooling import POOLINGS
    from retrbench.rerank import RERANKERS

    added = [(BACKBONES, "tiny"), (POOLINGS, "lse"), (RERANKERS, "nnqe"), (DATASETS, "pairs")]
    for reg, name in added:
        assert name not in reg
    try:
        for code in _blocks():
            exec(compile(code, str(DOC), "exec"), {})
        yield
    finally:
        for reg, name in added:
            if name in reg:
                reg.unregister(name)


def test_the_document_has_the_four_examples():
    assert len(_blocks()) == 4


def test_examples_register_and_run_end_to_end(examples, tmp_path):
    from retrbench.backbones import BACKBONES
    from retrbench.pooling import POOLINGS, gem, mac

    net = BACKBONES.create("tiny")
    x = torch.rand(1, 3, 32, 40)
    assert net(x).shape == (1, 16, 8, 10)
    m = torch.rand(2, 4, 3, 5)
    # log-mean-exp lies between the mean and the maximum, and tends to MAC as r grows
    lse = POOLINGS.create("lse", r=1000.0)(m)
    assert torch.all(lse <= mac(m) + 1e-5) and torch.all(lse >= gem(m, p=1.0) - 1e-5)
    assert torch.allclose(lse, mac(m), atol=1e-2)

    rng = np.random.default_rng(0)
    for side in ("a", "b"):
        (tmp_path / "pairs" / side).mkdir(parents=True)
    for i in range(4):
        base = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        for side in ("a", "b"):
            noisy = np.clip(base.astype(int) + rng.integers(-10, 10, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(tmp_path / "pairs" / side / f"{i}.jpg")
    res = rb.run(model="tiny", dataset="pairs", data_root=str(tmp_path), pooling="lse:r=5", rerank="nnqe", workers=0, results_dir=None)
    row = res.rows[0]
    assert (row["model_label"], row["pooling_label"], row["rerank_label"], row["dataset_label"]) == ("Tiny", "LSE(r=5)", "G+NN-QE", "Pairs")
    assert 0.0 <= res.value("mAP") <= 100.0 and len(res.per_query) == 4
