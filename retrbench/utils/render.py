"""The one table renderer: a DataFrame as Markdown, LaTeX (booktabs), HTML or CSV.

Every table retrbench prints goes through :func:`render` (the paper layouts of
:mod:`retrbench.reporting`, :meth:`retrbench.results.RunResult.to_latex`, ``retrbench
evaluate``), so escaping, number formatting and bold-best marking agree everywhere.

The frame's layout is kept:

* the index is written as leading columns headed by the index names, unless it is an unnamed
  ``RangeIndex`` (a plain table); the outer levels of a ``MultiIndex`` are shown once per group
  (``\\multirow`` in LaTeX, blank repeats in Markdown, sparsified in HTML; CSV repeats them);
* ``MultiIndex`` columns become ``\\multicolumn`` header rows in LaTeX and HTML, and
  ``"Easy mAP"`` (levels joined by a space) in Markdown and CSV;
* floats are shown with ``precision`` decimals, a missing value as ``--`` (empty in CSV).

LaTeX needs ``\\usepackage{booktabs,multirow}``. Every cell, header and index label is escaped
(:func:`latex_escape`), so names such as ``efficientnet_lite0`` compile; the ``caption`` is
LaTeX source and is written as given.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = ["FORMATS", "HTMLTable", "best_mask", "latex_escape", "render"]

FORMATS = ("markdown", "latex", "html", "csv")
BOLD_MODES = ("column", "group")

_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "_": r"\_",
    "%": r"\%",
    "&": r"\&",
    "#": r"\#",
    "$": r"\$",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_LATEX_RE = re.compile("|".join(re.escape(c) for c in _LATEX_SPECIAL))
_NA = "--"


class HTMLTable(str):
    """An HTML string that Jupyter renders as a table."""

    def _repr_html_(self) -> str:
        return str(self)


def latex_escape(text: object) -> str:
    r"""``text`` as LaTeX source that prints it literally: ``a_b & 5%`` -> ``a\_b \& 5\%``.

    Escapes the ten special characters ``\ _ % & # $ { } ~ ^`` in one pass (so the braces of
    ``\textbackslash{}`` are not escaped again).
    """
    return _LATEX_RE.sub(lambda m: _LATEX_SPECIAL[m.group()], str(text))


def best_mask(frame: pd.DataFrame, by: str = "column") -> pd.DataFrame:
    """True where a value is the largest of its column (``by="column"``) or of its column within
    its group of the outer index level (``by="group"``); ties are all True, non-numeric columns
    and missing values False. Shape: the frame's."""
    if by not in BOLD_MODES:
        raise ValueError(f"unknown bold mode {by!r}; choose {', '.join(BOLD_MODES)} or a boolean DataFrame")
    mask = pd.DataFrame(False, index=frame.index, columns=frame.columns)
    numeric = [i for i in range(frame.shape[1]) if pd.api.types.is_numeric_dtype(frame.iloc[:, i].dtype)]
    if not numeric or frame.empty:
        return mask
    values = frame.iloc[:, numeric].astype(float)
    if by == "group":
        best = values.groupby(level=0, sort=False).transform("max")
    else:
        best = pd.DataFrame(np.broadcast_to(values.max().to_numpy(), values.shape), index=values.index)
    hit = (values.to_numpy() == best.to_numpy()) & values.notna().to_numpy()  # (rows, numeric cols)
    out = mask.to_numpy().copy()
    out[:, numeric] = hit
    return pd.DataFrame(out, index=frame.index, columns=frame.columns)


def render(
    frame: pd.DataFrame,
    fmt: str,
    *,
    precision: int = 2,
    caption: str | None = None,
    bold: str | pd.DataFrame | None = None,
) -> str:
    """Render ``frame`` as ``markdown``, ``latex`` (booktabs), ``html`` or ``csv``.

    Args:
        frame: the table; its index becomes the leading columns (hidden when it is an unnamed
            ``RangeIndex``), ``MultiIndex`` rows and columns are grouped (see the module).
        fmt: one of :data:`FORMATS`.
        precision: decimals of float cells.
        caption: LaTeX: wrap the ``tabular`` in a centred ``table`` with this caption (LaTeX
            source, not escaped); HTML: the table's caption; ignored by Markdown and CSV.
        bold: mark best values (LaTeX ``\\textbf``, Markdown ``**``, HTML ``font-weight``):
            ``"column"`` (the largest of each column), ``"group"`` (of each column within each
            group of the outer index level) or a boolean DataFrame of the frame's shape; None:
            nothing bold. CSV is never marked.

    Returns:
        the text; for ``html`` an :class:`HTMLTable` (a ``str`` Jupyter displays as a table).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown table format {fmt!r}; choose {', '.join(FORMATS)}")
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"render expects a pandas DataFrame, got {type(frame).__name__}")
    if fmt == "csv":
        return _csv(frame, precision)
    mask = _mask(frame, bold)
    if fmt == "markdown":
        return _markdown(frame, precision, mask)
    if fmt == "latex":
        return _latex(frame, precision, caption, mask)
    return _html(frame, precision, caption, mask)


# ------------------------------------------------------------------------------------ helpers


def _mask(frame: pd.DataFrame, bold: str | pd.DataFrame | None) -> np.ndarray | None:
    """The bold mask as a (rows, cols) bool array, or None when nothing is bold."""
    if bold is None:
        return None
    if isinstance(bold, pd.DataFrame):
        if bold.shape != frame.shape:
            raise ValueError(f"bold mask has shape {bold.shape}, the frame {frame.shape}")
        mask = bold.to_numpy(dtype=bool)
    else:
        mask = best_mask(frame, bold).to_numpy(dtype=bool)
    return mask if mask.any() else None


def _shows_index(frame: pd.DataFrame) -> bool:
    index = frame.index
    return not (isinstance(index, pd.RangeIndex) and index.name is None)


def _index_names(frame: pd.DataFrame) -> list[str]:
    return ["" if n is None else str(n) for n in frame.index.names]


def _flat_columns(frame: pd.DataFrame) -> list[str]:
    """Column labels on one line: MultiIndex levels joined by a space (empty levels skipped)."""
    if isinstance(frame.columns, pd.MultiIndex):
        return [" ".join(str(p) for p in col if str(p)) for col in frame.columns]
    return [str(c) for c in frame.columns]


def _is_float(v: object) -> bool:
    return isinstance(v, (float, np.floating))


def _cell(v: object, precision: int) -> str:
    if v is None or (_is_float(v) and np.isnan(v)):
        return _NA
    if _is_float(v):
        return f"{v:.{precision}f}"
    return str(v)


def _numeric_columns(frame: pd.DataFrame) -> list[bool]:
    return [pd.api.types.is_numeric_dtype(frame.iloc[:, i].dtype) for i in range(frame.shape[1])]


def _is_number(v: object) -> bool:
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        return True
    try:
        float(str(v))
    except ValueError:
        return False
    return True


def _right_aligned(frame: pd.DataFrame) -> list[bool]:
    """Markdown alignment: right for numeric columns and for text columns of numbers only
    (``"512"``), as tabulate aligns them."""
    numeric = _numeric_columns(frame)
    return [n or all(_is_number(v) for v in frame.iloc[:, i] if not pd.isna(v)) for i, n in enumerate(numeric)]


def _sparse_index(index: pd.Index) -> list[list[str]]:
    """Index values per row and level, an outer level blank while it (and every level outside
    it) repeats the row above; the innermost level is always written."""
    rows = [list(t) if isinstance(index, pd.MultiIndex) else [t] for t in index]
    out: list[list[str]] = []
    for i, row in enumerate(rows):
        cells = []
        for level, v in enumerate(row):
            repeat = i > 0 and level < len(row) - 1 and rows[i - 1][: level + 1] == row[: level + 1]
            cells.append("" if repeat else str(v))
        out.append(cells)
    return out


# ------------------------------------------------------------------------------------ formats


def _csv(frame: pd.DataFrame, precision: int) -> str:
    flat = frame.copy()
    flat.columns = _flat_columns(frame)
    if not _shows_index(frame):
        return flat.to_csv(index=False, float_format=f"%.{precision}f", lineterminator="\n")
    flat.index = flat.index.set_names(_index_names(frame))
    return flat.reset_index().to_csv(index=False, float_format=f"%.{precision}f", lineterminator="\n")


def _markdown(frame: pd.DataFrame, precision: int, mask: np.ndarray | None) -> str:
    values = frame.to_numpy(dtype=object)
    cells = [[_cell(v, precision) for v in row] for row in values]
    if mask is not None:
        cells = [[f"**{c}**" if b and c != _NA else c for c, b in zip(row, brow, strict=True)] for row, brow in zip(cells, mask, strict=True)]
    header = _flat_columns(frame)
    align = ["right" if r else "left" for r in _right_aligned(frame)]
    if _shows_index(frame):
        index = _sparse_index(frame.index)
        cells = [i + row for i, row in zip(index, cells, strict=True)]
        header = _index_names(frame) + header
        align = ["left"] * frame.index.nlevels + align
    flat = pd.DataFrame(cells, columns=range(len(header)))
    flat.columns = header
    return flat.to_markdown(index=False, colalign=align, disable_numparse=True)


def _escaped_labels(index: pd.Index, escape) -> pd.Index:  # noqa: ANN001  (a str -> str callable)
    if isinstance(index, pd.MultiIndex):
        return pd.MultiIndex.from_tuples([tuple(escape(v) for v in t) for t in index], names=[None] * index.nlevels)
    return pd.Index([escape(v) for v in index], name=None)


def _latex(frame: pd.DataFrame, precision: int, caption: str | None, mask: np.ndarray | None) -> str:
    f = frame.copy()
    obj = [i for i, n in enumerate(_numeric_columns(frame)) if not n]
    for i in obj:  # text cells escaped here; Styler's own escaping stays off (no double escape)
        f.isetitem(i, [v if v is None or (_is_float(v) and np.isnan(v)) else latex_escape(v) for v in frame.iloc[:, i]])
    shown = _shows_index(frame)
    f.index = _escaped_labels(frame.index, latex_escape) if shown else pd.RangeIndex(len(frame))
    f.columns = _escaped_labels(frame.columns, latex_escape)
    st = f.style.format(precision=precision, na_rep=_NA)
    if mask is not None:
        st = st.apply(lambda _: np.where(mask, "textbf:--rwrap;", ""), axis=None)
    n_index = frame.index.nlevels if shown else 0
    if not shown:
        st = st.hide(axis="index")
    numeric = _numeric_columns(frame)
    tex = st.to_latex(
        hrules=True,
        clines="skip-last;data" if shown and isinstance(frame.index, pd.MultiIndex) else None,
        multirow_align="t",
        multicol_align="c",
        column_format="l" * n_index + "".join("r" if n else "l" for n in numeric),
        caption=caption,
        position_float="centering" if caption else None,
    )
    lines = tex.splitlines()
    names = [latex_escape(n) for n in _index_names(frame)]
    if shown and any(names):
        mid = lines.index("\\midrule")  # the header's last row gets the index names
        cells = lines[mid - 1].split("&")
        cells[:n_index] = [f"{n} " if i == 0 else f" {n} " for i, n in enumerate(names)]
        lines[mid - 1] = "&".join(cells)
    return "\n".join(_booktabs_rules(lines)) + "\n"


def _booktabs_rules(lines: Sequence[str]) -> list[str]:
    """Styler's ``\\cline`` rows as booktabs: a ``\\midrule`` between groups of the outer index
    level, nothing between inner groups or before ``\\bottomrule``."""
    out: list[str] = []
    for i, line in enumerate(lines):
        rules = line.split()
        if rules and all(r.startswith("\\cline{") for r in rules):
            outer = any(r.startswith("\\cline{1-") for r in rules)
            last = i + 1 < len(lines) and lines[i + 1].strip() == "\\bottomrule"
            if outer and not last:
                out.append("\\midrule")
            continue
        out.append(line)
    return out


def _html(frame: pd.DataFrame, precision: int, caption: str | None, mask: np.ndarray | None) -> HTMLTable:
    st = frame.style.format(precision=precision, na_rep=_NA, escape="html")
    st = st.format_index(escape="html", axis=0).format_index(escape="html", axis=1)
    if mask is not None:
        st = st.apply(lambda _: np.where(mask, "font-weight: bold;", ""), axis=None)
    if not _shows_index(frame):
        st = st.hide(axis="index")
    if caption:
        st = st.set_caption(caption)
    return HTMLTable(st.to_html())
