"""Faults: a SIGKILL in the middle of an extraction, and Ctrl-C at the command line.

After a kill, a rerun recomputes only the batches that were not flushed, and its descriptors
are bitwise those of an uninterrupted run. Ctrl-C prints one line and exits 130.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

NET = textwrap.dedent(
    """
    import time
    import torch

    class SlowNet(torch.nn.Module):
        '''A fixed random convolution (seeded), slow enough to be killed mid-way; counts images.'''

        def __init__(self, delay=0.0):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            with torch.no_grad():
                self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
                self.conv.bias.zero_()
            self.delay = delay
            self.images = 0

        def forward(self, x):
            time.sleep(self.delay)
            self.images += x.shape[0]
            return torch.relu(self.conv(x))

    def pool(x):
        return x.mean(dim=(2, 3))
    """
)


@pytest.fixture
def workdir(tmp_path):
    rng = np.random.default_rng(0)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(300):
        w, h = [(24, 16), (16, 24), (20, 20)][i % 3]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(imgs / f"{i:03d}.png")
    (tmp_path / "slownet.py").write_text(NET)
    return tmp_path


SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {work!r})
    from slownet import SlowNet, pool
    from retrbench.extraction import FeatureCache, ImageSpec, extract

    specs = [ImageSpec(p, None, 24) for p in sorted(Path({work!r}, "imgs").glob("*.png"))]
    extract(SlowNet(delay=0.02), pool, specs, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu", workers=0,
            batch_size=4, flush_seconds=0.1, cache=FeatureCache({cache!r}, "set", {{}}))
    """
)


def test_sigkill_mid_extraction_then_rerun_is_bitwise_identical(workdir):
    sys.path.insert(0, str(workdir))
    try:
        from slownet import SlowNet, pool
    finally:
        sys.path.remove(str(workdir))
    from retrbench.extraction import FeatureCache, ImageSpec, extract

    cache_dir = workdir / "cache"
    cache = FeatureCache(cache_dir, "set", {})
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(work=str(workdir), cache=str(cache_dir))], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while len(cache.done_batches()) < 10:  # at least 40 images flushed
            assert proc.poll() is None, "the extraction ended before it could be killed"
            assert time.monotonic() < deadline, "no progress within 2 minutes"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    done = cache.done_batches()
    assert not cache.complete and 10 <= len(done) < 75  # 300 images / 4 per batch = 75 batches

    specs = [ImageSpec(p, None, 24) for p in sorted((workdir / "imgs").glob("*.png"))]
    kw = dict(mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu", workers=0, batch_size=4)
    net = SlowNet()
    resumed = extract(net, pool, specs, cache=cache, **kw)
    assert net.images == 300 - 4 * len(done)  # only what was not flushed
    whole = extract(SlowNet(), pool, specs, cache=FeatureCache(workdir / "other", "set", {}), **kw)
    assert resumed.tobytes() == whole.tobytes()


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    script = textwrap.dedent(
        """
        import sys, time
        import retrbench.pipeline as pipeline
        from retrbench.cli import main

        def slow_run(*a, **k):
            print("ready", flush=True)
            time.sleep(60)

        pipeline.run = slow_run
        sys.exit(main(["run", "--model", "random", "--results-dir", "none"]))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retrbench run: interrupted"), err
