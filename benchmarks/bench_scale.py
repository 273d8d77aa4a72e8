"""rOxford + 1M distractors on one machine: time and peak memory of every stage at scale.

Synthetic descriptors with the real revisited rOxford ground truth (``gnd_roxford5k.pkl`` from
``../shared/data``; a seeded synthetic one of the same shape when absent) and ``--n`` distractors
appended after the 4993 rOxford images, as R1M is laid out. The 70 queries fall into landmarks
(queries sharing positives); each landmark has a centre, its queries and its easy / hard / junk
images are noisy copies of it (easy closest, hard furthest), the other images and the distractors
are clustered vectors (clusters of about 50 around shared super-centres). Everything is L2-normalised,
``D`` = ``--dims``.

Each step runs in a fresh subprocess, reading the descriptors memory-mapped (``.npy``), and
reports its wall time and its peak resident memory (``VmHWM`` of ``/proc/self/status``, which
a new program starts afresh, unlike ``ru_maxrss``, inherited from the parent on Linux: Python,
numpy, torch and faiss libraries included, and the pages of the memory-mapped files it touched):

* ``load``: open the memory map and read every row once (norms, block by block);
* ``whiten``: :func:`retrbench.whitening.postprocess` (L2, PCA-whitening learned on a seeded
  sample of ``--whiten-train`` database vectors, L2), written to a new ``.npy``;
* ``search``: exact full-ranking revisited evaluation (:func:`retrbench.evaluation.evaluate_scores`,
  no truncation) plus the exact top-100;
* ``aqe``, ``dba``, ``dba+aqe``, ``dfs``, ``dfs-offline``: the reranker from an exact top-1000,
  evaluated exactly over the whole database from the state's scores (``exact_evaluation``); the
  kNN graphs of DBA / diffusion are faiss IVF graphs above 20k vectors, their recall@k on a
  1000-vector sample is printed; graphs are cached on disk (a first run builds them: the time
  includes the build unless ``--warm``);
* ``ivfpq``: :func:`retrbench.search.search_index` with ``--ivfpq`` (default ``IVF4096,PQ{D/8}np``)
  and ``--nprobe``, its recall@k against exact search on the 70 queries, and the (approximate,
  top-1000) ranking's mAP.

    python benchmarks/bench_scale.py --n 1000000 --dims 128 512            # ~ R1M at D = 128 and 512
    python benchmarks/bench_scale.py --n 100000 --dims 128 --steps load search dba
    python benchmarks/bench_scale.py --n 1000000 --dims 2048 --steps load search   # 8 GiB of descriptors

Data (about ``(4993 + n) x D x 4`` bytes per dimension) and graph caches go to ``--workdir``
(default ``$RETRBENCH_CACHE/bench_scale``) and are reused by later runs with the same
``--n`` / ``--seed``. The machine is shared and noisy: repeat to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RETRBENCH_SHARED_DATA", ROOT.parent / "shared" / "data"))
# diffusion first: its k=50 graph (cached on disk) also serves DBA's k=6 lists
STEPS = ("load", "whiten", "search", "aqe", "dfs", "dfs-offline", "dba", "dba+aqe", "ivfpq")
RERANK_SPECS = {
    "aqe": "aqe:k=5",
    "dba": "dba:k=5",
    "dba+aqe": "dba:k=5+aqe:k=5",
    "dfs": "dfs",
    "dfs-offline": "dfs-offline",
}
TOP = 1000  # ranking length handed to the rerankers


# --------------------------------------------------------------------------- data


def load_gnd(seed: int) -> tuple[list[dict], int, str]:
    """The revisited rOxford ground truth (or a synthetic one of the same shape) and its database size."""
    path = SHARED / "revisitop" / "gnd_roxford5k.pkl"
    if path.exists():
        from retrbench.datasets.groundtruth import load_gnd_pickle

        data = load_gnd_pickle(path)
        gnd = [{k: np.asarray(g[k], dtype=np.int64) for k in ("easy", "hard", "junk")} for g in data["gnd"]]
        return gnd, len(data["imlist"]), str(path)
    rng = np.random.default_rng(seed)
    gnd = []
    for lm in range(14):
        imgs = rng.choice(4993, 120, replace=False)
        for _ in range(5):
            gnd.append({"easy": imgs[:40], "hard": imgs[40:80], "junk": imgs[80:]})
        del lm
    return gnd, 4993, "synthetic (gnd_roxford5k.pkl absent)"


def landmarks(gnd: list[dict]) -> np.ndarray:
    """Landmark id of every query: queries sharing a positive belong together (union-find)."""
    parent = list(range(len(gnd)))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    owner: dict[int, int] = {}
    for q, g in enumerate(gnd):
        for i in np.concatenate([g["easy"], g["hard"]]).tolist():
            if i in owner:
                parent[find(q)] = find(owner[i])
            else:
                owner[i] = q
    roots = [find(q) for q in range(len(gnd))]
    return np.unique(roots, return_inverse=True)[1]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_data(folder: Path, n: int, d: int, seed: int) -> tuple[Path, Path, list[dict]]:
    """Write ``database.npy`` ((4993 + n) x d) and ``queries.npy`` (70 x d) into ``folder`` (once)."""
    gnd, n_ox, _ = load_gnd(seed)
    db_path, q_path = folder / "database.npy", folder / "queries.npy"
    if db_path.exists() and q_path.exists():
        return db_path, q_path, gnd
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lm = landmarks(gnd)
    centres = _unit(rng.standard_normal((lm.max() + 1, d)))
    noise = {"easy": 0.8, "hard": 2.0, "junk": 1.5}
    role = np.full(n_ox, -1)  # landmark of each rOxford image, -1 = none
    level = np.zeros(n_ox)
    for q, g in enumerate(gnd):
        for key in ("junk", "hard", "easy"):  # the closest role wins
            role[g[key]] = lm[q]
            level[g[key]] = noise[key]
    n_total = n_ox + n
    n_clusters = max(1, n_total // 50)
    supers = rng.standard_normal((max(1, n_clusters // 20), d)).astype(np.float32)
    cl = _unit(
        supers[rng.integers(0, len(supers), n_clusters)] + 0.8 * rng.standard_normal((n_clusters, d)).astype(np.float32)
    )
    tmp = db_path.with_suffix(".tmp.npy")
    mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n_total, d))
    for lo in range(0, n_total, 65536):
        hi = min(lo + 65536, n_total)
        lab = rng.integers(0, n_clusters, hi - lo)
        x = cl[lab] + (0.6 / np.sqrt(d)) * rng.standard_normal((hi - lo, d)).astype(np.float32)
        own = np.arange(lo, hi) < n_ox
        if own.any():
            idx = np.arange(lo, hi)[own]
            has = role[idx] >= 0
            ids = idx[has]
            x[np.flatnonzero(own)[has]] = centres[role[ids]] + (level[ids, None] / np.sqrt(d)) * rng.standard_normal(
                (ids.size, d)
            ).astype(np.float32)
        mm[lo:hi] = _unit(x)
    mm.flush()
    del mm
    os.replace(tmp, db_path)
    q = _unit(centres[lm] + (0.5 / np.sqrt(d)) * rng.standard_normal((len(gnd), d)).astype(np.float32))
    np.save(q_path, q)
    return db_path, q_path, gnd


# --------------------------------------------------------------------------- one step (child process)


def _maps(metrics) -> dict[str, float]:
    return {m.split[0].upper(): round(m.value, 2) for m in metrics if m.name == "mAP"}


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (``VmHWM``; ``ru_maxrss`` where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_step(step: str, folder: Path, seed: int, args: dict) -> dict:
    import torch  # noqa: F401  (libraries loaded before the clock starts, as in a real run)

    from retrbench.evaluation import evaluate, evaluate_scores, exact_evaluation
    from retrbench.rerank import RankState, build_reranker
    from retrbench.search import search, search_index
    from retrbench.utils.linalg import InnerProductScores

    gnd, _, _ = load_gnd(seed)
    out: dict = {"step": step, "rss_start_mib": peak_rss_mib()}
    raw = np.load(folder / "database.npy", mmap_mode="r")
    white = folder / "database.white.npy"
    t0 = time.perf_counter()
    if step == "load":
        norms = np.concatenate([np.linalg.norm(raw[lo : lo + 65536], axis=1) for lo in range(0, raw.shape[0], 65536)])
        out["note"] = f"{raw.shape[0]} x {raw.shape[1]} float32, norms {norms.min():.3f}..{norms.max():.3f}"
    elif step == "whiten":
        from retrbench.utils.io import atomic_save_npy
        from retrbench.whitening import postprocess

        q = np.load(folder / "queries.npy")
        rng = np.random.default_rng(seed)
        m = min(raw.shape[0], args["whiten_train"])
        train = raw[np.sort(rng.choice(raw.shape[0], m, replace=False))]
        dbw, qw, info = postprocess(raw, q, raw.shape[1], train)
        out["whiten_s"] = time.perf_counter() - t0
        atomic_save_npy(white, dbw)
        atomic_save_npy(folder / "queries.white.npy", qw)
        out["note"] = f"learned on {info['train_size']} sampled vectors, dim {info['dim']}"
    else:
        db = np.load(white if white.exists() else folder / "database.npy", mmap_mode="r")
        q = np.load(folder / ("queries.white.npy" if white.exists() else "queries.npy"))
        if step == "search":
            metrics = evaluate_scores(q, db, gnd, "revisited")
            out["eval_s"] = time.perf_counter() - t0
            top = search(q, db, 100)
            out["mAP"] = _maps(metrics)
            out["note"] = (
                f"exact full ranking ({db.shape[0]}); top-100 search {time.perf_counter() - t0 - out['eval_s']:.1f} s"
            )
            del top
        elif step == "ivfpq":
            spec = args["ivfpq"] or f"IVF4096,PQ{max(1, db.shape[1] // 8)}np"
            res, info = search_index(q, db, TOP, spec, nprobe=args["nprobe"], seed=seed)
            out["mAP"] = _maps(evaluate(res.indices, gnd, "revisited", n_database=db.shape[0]))
            rec = ", ".join(f"R@{k} {v:.3f}" for k, v in info["recall"].items())
            out["note"] = (
                f"{info['index']} nprobe {info['params'].get('nprobe')}, trained on {info['train_size']}: "
                f"train {info['train_s']:.0f} s, add {info['add_s']:.0f} s, search {info['search_s']:.2f} s; {rec}; "
                f"mAP of the top-{TOP}"
            )
        else:
            spec = RERANK_SPECS[step]
            if args["warm"]:  # build (or read) the graphs first, then time the step
                build_reranker(spec)(RankState(q[:2], db, search(q[:2], db, TOP)))
                t0 = time.perf_counter()
            state = RankState(q, db, search(q, db, TOP), scores=InnerProductScores(q, db))
            state = build_reranker(spec, progress=False)(state)
            out["rerank_s"] = time.perf_counter() - t0
            ev = exact_evaluation(state.scores, gnd, "revisited")
            out["mAP"] = _maps(ev.metrics)
            notes = []
            for r in state.reports:
                g = r.details.get("graph")
                if g:
                    made = f"read from {g['cached']}" if g["cached"] else f"built in {g['build_s']:.0f} s"
                    notes.append(
                        f"{r.step}: {g['kind']} graph {g['index']} {g['params']} k={g['k']} "
                        f"recall@k {g['recall']:.3f} ({g['recall_sample']} sampled; {made})"
                    )
            out["note"] = "; ".join(notes) + ("; evaluated exactly" if ev.ranking_length == db.shape[0] else "")
    out["time_s"] = time.perf_counter() - t0
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def run_child(step: str, folder: Path, seed: int, args: dict, env: dict) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--_child",
        json.dumps({"step": step, "folder": str(folder), "seed": seed, "args": args}),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        return {
            "step": step,
            "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}",
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="distractors appended to the 4993 rOxford images")
    p.add_argument("--dims", type=int, nargs="+", default=[128, 512])
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--whiten-train", type=int, default=100_000)
    p.add_argument("--ivfpq", default="", help="faiss index_factory string (default IVF4096,PQ{D/8}np)")
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--warm", action="store_true", help="build / read the kNN graphs before timing the rerankers")
    p.add_argument("--workdir", default="")
    p.add_argument("--json", help="also write every number to this file")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        c = json.loads(a._child)
        print(json.dumps(run_step(c["step"], Path(c["folder"]), c["seed"], c["args"])))
        return 0
    from retrbench.utils.paths import default_cache_root

    work = Path(a.workdir) if a.workdir else default_cache_root() / "bench_scale"
    env = dict(os.environ, RETRBENCH_CACHE=str(work / "cache"))
    args = {"whiten_train": a.whiten_train, "ivfpq": a.ivfpq, "nprobe": a.nprobe, "warm": a.warm}
    _, n_ox, source = load_gnd(a.seed)
    print(
        f"rOxford ground truth: {source}; {n_ox} + {a.n} database vectors; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    )
    report = []
    for d in a.dims:
        folder = work / f"n{a.n}-d{d}-s{a.seed}"
        t0 = time.perf_counter()
        make_data(folder, a.n, d, a.seed)
        print(f"\nD = {d}: data in {folder} ({time.perf_counter() - t0:.0f} s to make or find)", flush=True)
        print(f"  {'step':<12} {'time s':>8} {'peak GiB':>9}  {'E / M / H mAP':<22} notes", flush=True)
        for step in a.steps:
            r = run_child(step, folder, a.seed, args, env)
            r["d"] = d
            report.append(r)
            if "error" in r:
                print(f"  {step:<12} failed: {r['error']}", flush=True)
                continue
            m = r.get("mAP", {})
            maps = " / ".join(f"{m[s]:.2f}" for s in "EMH") if m else ""
            print(
                f"  {step:<12} {r['time_s']:8.1f} {r['peak_rss_mib'] / 1024:9.2f}  {maps:<22} {r.get('note', '')}",
                flush=True,
            )
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
