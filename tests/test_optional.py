"""A required optional package fails the run where it is missing; otherwise its tests skip (tests/_optional.py)."""
import pytest
from _optional import import_or_skip


def test_missing_package_skips_unless_the_run_requires_it(monkeypatch):
    monkeypatch.delenv("PRUNE_SPARSE_REQUIRE", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs it"):
        import_or_skip("no_such_package_here", reason="needs it")
    monkeypatch.setenv("PRUNE_SPARSE_REQUIRE", "triton,no_such_package_here")
    with pytest.raises(ModuleNotFoundError):
        import_or_skip("no_such_package_here", reason="needs it")
    assert import_or_skip("json", reason="stdlib").dumps(1) == "1"
