import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from retrbench.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert commands, ".ci/run runs nothing"
    for line in commands:
        assert line in readme, f".ci/run line not in README.md: {line}"


def test_models_and_datasets_listings(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0" in out and "1280" in out
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"roxford5k.*revisited", out) and "demo" in out


def test_run_prints_markdown_and_latex(capsys, tmp_path):
    args = ["run", "--model", "random", "--dataset", "demo", "--whiten", "none", "--workers", "0", "--results-dir", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Medium mAP" in out and out.lstrip().startswith("|")
    assert main([*args, "--format", "latex"]) == 0
    out = capsys.readouterr().out
    assert "\\toprule" in out and "\\bottomrule" in out
    assert (tmp_path / "results.jsonl").read_text().count("\n") == 24


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["run", "--model", "efficientnet_lite", "--dataset", "demo"]) == 2
    assert "did you mean 'efficientnet_lite0'" in capsys.readouterr().err


def test_evaluate_own_ranks(tmp_path, capsys):
    gnd = {
        "imlist": [f"im{i}" for i in range(5)],
        "qimlist": ["q0", "q1"],
        "gnd": [{"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 1, 1]}, {"easy": [3, 4], "hard": [], "junk": []}],
    }
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(gnd))
    ranks = np.array([[0, 1, 2, 3, 4], [3, 4, 0, 1, 2]])
    np.save(tmp_path / "ranks.npy", ranks)
    out_json = tmp_path / "out.json"
    assert main(["evaluate", "--ranks", str(tmp_path / "ranks.npy"), "--gnd", str(tmp_path / "gnd.pkl"), "--json", str(out_json)]) == 0
    assert "Medium mAP" in capsys.readouterr().out
    import json

    metrics = {(m["split"], m["metric"]): m["value"] for m in json.loads(out_json.read_text())["metrics"]}
    assert metrics[("medium", "mAP")] == pytest.approx(100.0)
    # wrong orientation (database x queries) is refused with a clear message
    np.save(tmp_path / "bad.npy", ranks.T)
    assert main(["evaluate", "--ranks", str(tmp_path / "bad.npy"), "--gnd", str(tmp_path / "gnd.pkl")]) == 1
    assert "rows" in capsys.readouterr().err


def test_verbose_and_quiet_are_accepted_after_the_subcommand(capsys):
    assert main(["models", "-v", "efficientnet*"]) == 0
    assert main(["-q", "datasets", "-vv"]) == 0


def test_exit_codes_usage_failure_and_traceback(tmp_path, capsys):
    # bad usage (a misspelt reranker): 2, one line, nothing computed
    assert main(["run", "--model", "random", "--rerank", "aqee", "--results-dir", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean 'aqe'" in err[0]
    assert main(["run", "--pooling", "gem:q=3", "--results-dir", "none"]) == 2
    assert "unknown parameter(s) q" in capsys.readouterr().err
    # a failure while running: 1, one line; with -vv the traceback too
    missing = ["run", "--model", "random", "--dataset", "roxford5k", "--data-root", str(tmp_path), "--results-dir", "none"]
    assert main(missing) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "-vv" in err
    assert main([*missing, "-vv"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import retrbench.pipeline as pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "run", interrupted)
    assert main(["run", "--model", "random", "--results-dir", "none"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0]


def test_run_json_has_rows_and_config(tmp_path, capsys):
    import json

    args = ["run", "--model", "random", "--dataset", "demo", "--whiten", "none", "--workers", "0", "--results-dir", "none", "--json", "-"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["model"] == "random" and data["config"]["whiten"] is None
    got = {(r["split"], r["metric"]) for r in data["rows"]}
    assert ("medium", "mAP") in got and all(r["model_label"] == "Random" for r in data["rows"])


def test_help_lists_every_registry_entry_and_examples(capsys):
    from retrbench.backbones import BACKBONES
    from retrbench.pooling import POOLINGS
    from retrbench.rerank import RERANKERS

    with pytest.raises(SystemExit) as e:
        main(["run", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in [*POOLINGS.list(), *RERANKERS.list(), *BACKBONES.list()]:
        assert name in out, name
    assert "native" in out and "examples:" in out and "timm:..." in out
    with pytest.raises(SystemExit):
        main(["evaluate", "--protocol", "revisted", "--ranks", "r.npy", "--gnd", "g.pkl"])
    assert "invalid choice: 'revisted'" in capsys.readouterr().err


def _command_names():
    from retrbench.cli.main import COMMANDS, _load_commands

    _load_commands()
    return COMMANDS.list()


@pytest.mark.parametrize("name", _command_names())
def test_every_command_has_help_and_examples(name, capsys):
    """Registry-wide: each registered command parses --help, with a help line and examples."""
    from retrbench.cli import COMMANDS

    entry = COMMANDS.get(name)
    assert entry.help and entry.info.examples
    assert all(e.startswith(f"retrbench {name}") or e.startswith("retrbench ") for e in entry.info.examples)
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: retrbench {name}") and "examples:" in out and "--verbose" in out


def test_module_entry_point():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "retrbench", "--version"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("retrbench ")
