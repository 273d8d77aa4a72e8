import pytest

from retrbench.registry import Registry


def make() -> Registry:
    reg: Registry = Registry("widget")

    @reg.register("alpha", aliases=("a",), info={"x": 1})
    def alpha(scale: int = 1) -> int:
        """The alpha widget."""
        return 10 * scale

    reg.register("beta", lambda: 2)
    return reg


def test_create_alias_and_case():
    reg = make()
    assert reg.create("alpha", scale=2) == 20
    assert reg.create("A") == 10
    assert reg.get("ALPHA").info == {"x": 1}
    assert reg.get("alpha").doc == "The alpha widget."
    assert "a" in reg and "gamma" not in reg


def test_list_glob_and_iteration_sorted():
    reg = make()
    assert reg.list() == ["alpha", "beta"]
    assert reg.list("b*") == ["beta"]
    assert [e.name for e in reg] == ["alpha", "beta"]
    assert len(reg) == 2


def test_duplicate_name_or_alias_raises():
    reg = make()
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha", lambda: 0)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("other", lambda: 0, aliases=("a",))


def test_unknown_name_suggests_closest():
    reg = make()
    with pytest.raises(KeyError, match="did you mean 'alpha'"):
        reg.get("alpah")


def test_unregister_removes_aliases():
    reg = make()
    reg.unregister("a")
    assert "alpha" not in reg and "a" not in reg
