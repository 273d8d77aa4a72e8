from dataclasses import dataclass

import pytest

from retrbench.registry import EntryInfo, Registry


@dataclass(frozen=True)
class WidgetInfo(EntryInfo):
    size: int = 0


def make() -> Registry:
    reg: Registry = Registry("widget", WidgetInfo)

    @reg.register("alpha", aliases=("a",), info=WidgetInfo(label="Alpha", order=2, size=1))
    def alpha(scale: int = 1) -> int:
        """The alpha widget."""
        return 10 * scale

    reg.register("beta", lambda: 2, info=WidgetInfo(order=1, help="the beta widget"))
    return reg


def test_create_alias_and_case():
    reg = make()
    assert reg.create("alpha", scale=2) == 20
    assert reg.create("A") == 10
    assert reg.get("ALPHA").info.size == 1
    assert "a" in reg and "gamma" not in reg


def test_metadata_defaults_from_name_and_docstring():
    reg = make()
    alpha, beta = reg.get("alpha"), reg.get("beta")
    assert (alpha.label, alpha.help) == ("Alpha", "The alpha widget.")
    assert (beta.label, beta.help) == ("beta", "the beta widget")  # label defaults to the name
    assert reg.label("A") == "Alpha" and reg.label("timm:x") == "timm:x"
    # an entry registered without info gets the registry's info type
    reg.register("gamma", lambda: 3)
    assert isinstance(reg.get("gamma").info, WidgetInfo) and reg.get("gamma").label == "gamma"


def test_list_glob_and_iteration_by_order_then_name():
    reg = make()
    assert reg.list() == ["alpha", "beta"]
    assert reg.list("b*") == ["beta"]
    assert [e.name for e in reg] == ["beta", "alpha"]  # order 1 before order 2
    assert len(reg) == 2


def test_duplicate_name_or_alias_raises():
    reg = make()
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha", lambda: 0)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("other", lambda: 0, aliases=("a",))


def test_unknown_name_suggests_closest_and_lists_prefixes():
    reg = make()

    @reg.resolver("ext:", help="external widgets")
    def ext(rest: str, **kw):
        return rest

    with pytest.raises(KeyError, match="did you mean 'alpha'.*or ext:\\.\\.\\."):
        reg.get("alpah")


def test_resolvers_build_names_outside_the_registry():
    reg = make()
    seen = []

    @reg.resolver("ext:", help="external widgets")
    def ext(rest: str, scale: int = 1):
        seen.append(rest)
        return len(rest) * scale

    @reg.resolver(match=lambda n: n.endswith(".w"), help="widget files")
    def files(rest: str, **kw):
        return f"file {rest}"

    assert reg.create("EXT:abc", scale=2) == 6 and seen == ["abc"]  # prefix is case-insensitive, rest kept
    assert reg.create("my.w") == "file my.w"
    assert reg.create("alpha") == 10  # entries win over resolvers
    assert reg.is_known("ext:anything") and reg.is_known("a") and not reg.is_known("zzz")
    assert reg.find_resolver("alpha") is None
    assert "ext:...: external widgets" in reg.help_text() and "widget files" in reg.help_text()
    with pytest.raises(ValueError, match="already registered"):
        reg.resolver("ext:")(ext)
    with pytest.raises(ValueError, match="shadowed by a resolver prefix"):
        reg.register("ext:beta", lambda: 0)
    with pytest.raises(ValueError, match="needs a prefix or a match"):
        reg.resolver()


def test_unregister_removes_aliases():
    reg = make()
    reg.unregister("a")
    assert "alpha" not in reg and "a" not in reg
    reg.register("alpha", lambda: 1, aliases=("a",))
    assert reg.create("a") == 1
