"""The house rules that keep retrbench extensible, checked mechanically.

* import-linter's contracts in pyproject.toml (stages never import sibling stages; training and
  reports do not go through the pipeline);
* ``retrbench --help`` and ``import retrbench`` import no torch, faiss or pandas;
* no module over 500 lines without saying why in its docstring.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "retrbench"
HEAVY = ("torch", "faiss", "pandas", "timm", "scipy", "sklearn")


def test_import_contracts_hold():
    pytest.importorskip("importlinter", reason="import-linter is in the test extra")
    exe = Path(sys.executable).parent / "lint-imports"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "BROKEN" not in proc.stdout and "KEPT" in proc.stdout


def _imported_modules(code: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    assert "retrbench" in names, "importtime output not understood"
    return names


def test_help_imports_no_heavy_library():
    names = _imported_modules("import sys; from retrbench.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert not names & set(HEAVY), f"retrbench --help imported {sorted(names & set(HEAVY))}"


def test_package_import_is_lazy():
    names = _imported_modules("import retrbench; retrbench.__version__; retrbench.RunConfig")
    assert not names & set(HEAVY), f"import retrbench imported {sorted(names & set(HEAVY))}"


def test_lazy_attributes_resolve():
    import retrbench as rb

    for name in rb.__all__:
        assert getattr(rb, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        rb.nope  # noqa: B018


MAX_LINES = 500
REASON = "This module is long because"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_are_short_or_say_why(path: Path):
    text = path.read_text(encoding="utf-8")
    n = text.count("\n")
    if n <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(text)) or ""
    assert REASON in doc, f"{path.relative_to(ROOT)} has {n} lines; split it or say why in its docstring ('{REASON} ...')"
