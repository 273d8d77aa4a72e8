"""The one spec grammar (retrbench.specs): hand-written cases and round trips."""

import pytest

from retrbench.specs import ModelRef, Pipeline, Step, parse_models, parse_pipeline, parse_step, parse_value


@pytest.mark.parametrize(
    "text, value",
    [("3", 3), ("-2", -2), ("0.5", 0.5), ("1e-3", 0.001), ("exact", "exact"), ("3x", "3x")],
)
def test_values(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "text, name, params",
    [
        ("gem", "gem", {}),
        ("GeM:P=4", "gem", {"p": 4}),
        ("gem(p=4.0)", "gem", {"p": 4.0}),
        (" rmac : levels = 2 ", "rmac", {"levels": 2}),
        ("dfs:k=50,kq=10,alpha=0.99", "dfs", {"k": 50, "kq": 10, "alpha": 0.99}),
        ("dfs-offline:trunc=1000", "dfs-offline", {"trunc": 1000}),
    ],
)
def test_step(text, name, params):
    step = parse_step(text)
    assert (step.name, step.kwargs) == (name, params)
    assert parse_step(str(step)) == step  # canonical text round-trips


def test_step_params_are_sorted_so_equal_specs_are_equal():
    assert parse_step("aqe:k=2,alpha=3") == parse_step("aqe:alpha=3,k=2")
    assert str(parse_step("aqe:k=2,alpha=3")) == "aqe:alpha=3,k=2"


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "expected 'name'"),
        ("9gem", "expected 'name'"),
        ("gem:p", "'p' is not of the form key=value"),
        ("gem:p=", "'p=' is not of the form key=value"),
        ("gem:p=3,p=4", "'p' given twice"),
    ],
)
def test_bad_steps(text, message):
    with pytest.raises(ValueError, match=message):
        parse_step(text, "pooling spec")


def test_pipeline():
    assert parse_pipeline("none") == Pipeline() == parse_pipeline("") == parse_pipeline("G") == parse_pipeline(None)
    p = parse_pipeline("g+dba+aqe:k=5,alpha=3")
    assert p.names == ("dba", "aqe") and p.steps[1].kwargs == {"k": 5, "alpha": 3}
    assert str(p) == "dba+aqe:alpha=3,k=5" and parse_pipeline(str(p)) == p
    assert str(Pipeline()) == "none" and not Pipeline()
    with pytest.raises(ValueError, match="empty step"):
        parse_pipeline("dba+")
    with pytest.raises(ValueError, match="'g' .* takes no parameters"):
        parse_pipeline("g:k=1+aqe")


def test_models():
    assert parse_models("a") == (ModelRef("a"),)
    assert parse_models("a+b", "x.pth+y.pth") == (ModelRef("a", "x.pth"), ModelRef("b", "y.pth"))
    # one model keeps a weights path containing '+' whole
    assert parse_models("a", "runs/a+b.pth") == (ModelRef("a", "runs/a+b.pth"),)
    with pytest.raises(ValueError, match="names no model"):
        parse_models(" + ")
    with pytest.raises(ValueError, match="has 2 models but weights"):
        parse_models("a+b", "x.pth")


def test_step_type_errors():
    with pytest.raises(TypeError, match="expected a string"):
        parse_step(3)  # type: ignore[arg-type]
    assert parse_step(Step("gem")) == Step("gem")
