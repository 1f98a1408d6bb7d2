"""Each package's public surface is its ``__init__`` with ``__all__``; keep ``__all__`` honest."""

from __future__ import annotations

import importlib
import types

import pytest

PACKAGES = ["ttstore", "factlog", "snapshotter", "timetravel_api", "simworld"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_exactly_the_public_names(name: str) -> None:
    mod = importlib.import_module(name)
    exported = set(mod.__all__)
    assert len(exported) == len(mod.__all__), "duplicates in __all__"
    for attr in exported:
        assert hasattr(mod, attr), f"{name}.__all__ names {attr!r}, which does not exist"
    public = {
        a for a, v in vars(mod).items()
        if not a.startswith("_") and not isinstance(v, types.ModuleType) and a != "annotations"
    }
    assert public == exported, f"public names not in __all__: {sorted(public - exported)}"


@pytest.mark.parametrize("name", PACKAGES)
def test_all_exports_come_from_private_modules(name: str) -> None:
    mod = importlib.import_module(name)
    for attr in mod.__all__:
        origin = getattr(getattr(mod, attr), "__module__", None)
        if origin is not None and origin.startswith(name + "."):
            leaf = origin.rsplit(".", 1)[-1]
            assert leaf.startswith("_"), f"{name}.{attr} is defined in public module {origin}"
