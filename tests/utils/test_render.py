"""The one table renderer (retrbench/utils/render.py): every format, bold, LaTeX escaping."""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest

from retrbench.utils.render import FORMATS, HTMLTable, best_mask, latex_escape, render

UNESCAPED_UNDERSCORE = re.compile(r"(?<!\\)_")

# each special character and what LaTeX needs to print it
SPECIAL = {
    "_": r"\_",
    "%": r"\%",
    "&": r"\&",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
}


def grouped() -> pd.DataFrame:
    """Two dataset groups x methods; the best of each column per group is known by hand."""
    index = pd.MultiIndex.from_tuples([("A", "m1"), ("A", "m2"), ("B", "m1")], names=["Dataset", "Method"])
    return pd.DataFrame({"x": [1.0, 3.0, 0.5], "y": [2.0, np.nan, 0.25]}, index=index)


# ------------------------------------------------------------------------------------ escaping


@pytest.mark.parametrize("char, want", SPECIAL.items())
def test_latex_escape_each_special_character(char, want):
    assert latex_escape(f"a{char}b") == f"a{want}b"


def test_latex_escape_is_one_pass():
    assert latex_escape("\\{}") == r"\textbackslash{}\{\}"  # the braces it adds are not escaped again
    assert latex_escape("plain text 1.5") == "plain text 1.5"
    assert latex_escape(512) == "512"


def test_latex_escapes_cells_headers_and_index_labels():
    every = "".join(SPECIAL)
    columns = pd.MultiIndex.from_tuples([(f"top{every}", f"col{every}"), (f"top{every}", "n")])
    index = pd.MultiIndex.from_tuples([(f"g{every}", f"r{every}")], names=[f"I{every}", "J"])
    df = pd.DataFrame([[f"cell{every}", 1.5]], index=index, columns=columns)
    tex = render(df, "latex")
    escaped = latex_escape(every)
    for text in (f"top{escaped}", f"col{escaped}", f"g{escaped}", f"r{escaped}", f"cell{escaped}", f"I{escaped}"):
        assert text in tex
    body = tex.replace(escaped, "")
    assert not re.search(r"[_%#$~^]", body)  # what is left is LaTeX's own syntax
    rows = [ln for ln in body.splitlines() if ln.endswith("\\\\")]
    # every & left separates columns: 2 + a \multicolumn{2} in the top header row, 4 below
    assert [ln.count("&") for ln in rows] == [2, 3, 3]


def test_latex_of_every_registry_name_has_no_unescaped_underscore():
    from retrbench.backbones import BACKBONES
    from retrbench.datasets import DATASETS

    names = [n for reg in (BACKBONES, DATASETS) for e in reg for n in (e.name, *e.aliases)]
    assert any("_" in n for n in names)  # the test has something to catch
    df = pd.DataFrame({"mAP": np.linspace(10, 90, len(names))}, index=pd.Index(names, name="model_name"))
    df["note"] = names
    for tex in (render(df, "latex"), render(df, "latex", bold="column", caption="c")):
        assert not UNESCAPED_UNDERSCORE.search(tex), UNESCAPED_UNDERSCORE.findall(tex)
        assert tex.count("efficientnet\\_lite0") == 2  # index and cell


# ------------------------------------------------------------------------------------ formats


def test_markdown():
    md = render(grouped(), "markdown", bold="group")
    assert md.splitlines() == [
        "| Dataset   | Method   |        x |        y |",
        "|:----------|:---------|---------:|---------:|",
        "| A         | m1       |     1.00 | **2.00** |",
        "|           | m2       | **3.00** |       -- |",
        "| B         | m1       | **0.50** | **0.25** |",
    ]
    plain = render(pd.DataFrame({"name": ["a", "b"], "v": [1.0, 2.5]}), "markdown", precision=1)
    assert plain.splitlines() == ["| name   |   v |", "|:-------|----:|", "| a      | 1.0 |", "| b      | 2.5 |"]  # no index column


def test_csv():
    assert render(grouped(), "csv", precision=1) == "Dataset,Method,x,y\nA,m1,1.0,2.0\nA,m2,3.0,\nB,m1,0.5,0.2\n"
    cols = pd.MultiIndex.from_tuples([("Easy", "mAP"), ("Hard", "mAP")])
    back = pd.read_csv(io.StringIO(render(pd.DataFrame([[1.0, 2.0]], columns=cols), "csv")))
    assert list(back.columns) == ["Easy mAP", "Hard mAP"] and back.iloc[0].tolist() == [1.0, 2.0]


def test_latex():
    tex = render(grouped(), "latex", bold="group")
    assert tex.splitlines() == [
        "\\begin{tabular}{llrr}",
        "\\toprule",
        "Dataset & Method & x & y \\\\",
        "\\midrule",
        "\\multirow[t]{2}{*}{A} & m1 & 1.00 & \\textbf{2.00} \\\\",
        " & m2 & \\textbf{3.00} & -- \\\\",
        "\\midrule",
        "B & m1 & \\textbf{0.50} & \\textbf{0.25} \\\\",
        "\\bottomrule",
        "\\end{tabular}",
    ]
    wrapped = render(grouped(), "latex", caption="Results $\\times$ 2")
    assert wrapped.startswith("\\begin{table}\n\\centering\n\\caption{Results $\\times$ 2}\n")  # caption is LaTeX source
    assert "\\textbf" not in wrapped and wrapped.rstrip().endswith("\\end{table}")


def test_latex_multiindex_columns_and_deep_index():
    cols = pd.MultiIndex.from_tuples([("Easy", "mAP"), ("Easy", "mP@5"), ("Hard", "mAP")])
    index = pd.MultiIndex.from_tuples([("a", "x", "1"), ("a", "x", "2"), ("a", "y", "1"), ("b", "x", "1")], names=["A", "B", "C"])
    tex = render(pd.DataFrame(np.arange(12.0).reshape(4, 3), index=index, columns=cols), "latex")
    assert "\\multicolumn{2}{c}{Easy}" in tex and "A & B & C & mAP & mP@5 & mAP \\\\" in tex
    assert "\\cline" not in tex and tex.count("\\midrule") == 2  # after the header, between a and b


def test_html():
    df = grouped()
    df.index = df.index.set_levels(["<A>", "B"], level=0)
    html = render(df, "html", bold="group", caption="Cap")
    assert isinstance(html, HTMLTable) and html._repr_html_() == html
    assert "<caption>Cap</caption>" in html and "&lt;A&gt;" in html and "<A>" not in html
    assert html.count("font-weight: bold;") == 1 and ">--</td>" in html
    styled = re.search(r"\{\s*font-weight: bold;", html).start()
    assert html[:styled].count("_row") == 4  # four bold cells share the rule
    assert "font-weight" not in render(df, "html")


def test_best_mask_modes():
    df = grouped()
    np.testing.assert_array_equal(best_mask(df, "group").to_numpy(), [[False, True], [True, False], [True, True]])
    np.testing.assert_array_equal(best_mask(df, "column").to_numpy(), [[False, True], [True, False], [False, False]])
    tied = pd.DataFrame({"v": [1.0, 1.0], "s": ["a", "b"]})
    np.testing.assert_array_equal(best_mask(tied).to_numpy(), [[True, False], [True, False]])  # ties all; text never
    explicit = pd.DataFrame(False, index=df.index, columns=df.columns)
    explicit.iloc[2, 0] = True
    assert render(df, "markdown", bold=explicit).count("**") == 2


def test_errors():
    df = grouped()
    assert FORMATS == ("markdown", "latex", "html", "csv")
    with pytest.raises(ValueError, match="unknown table format 'docx'"):
        render(df, "docx")
    with pytest.raises(ValueError, match="unknown bold mode"):
        render(df, "latex", bold="row")
    with pytest.raises(ValueError, match="shape"):
        render(df, "latex", bold=pd.DataFrame([[True]]))
    with pytest.raises(TypeError, match="DataFrame"):
        render([[1.0]], "csv")
