"""The simulated world: microservices with time-varying state, the compute app, and the demo.

It may use every product package; no product package imports it.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:
    from ._server import (
        READY_PREFIX,
        RunningWorld,
        SimControl,
        WorldProcess,
        running_world,
        serve,
        services_toml,
        spawn_world,
    )
    from ._services import ENTITY_SERVICES, Faults, SimClock, SimState, make_app
    from ._world import (
        ACTIVITY_LEVELS,
        DEVICES,
        GENRES,
        PLANS,
        REGIONS,
        TENURE_BUCKETS,
        Plays,
        World,
    )

# Loaded on first use: ``timetravel`` imports this package to register ``demo``, and should not
# pay for aiohttp and numpy on every command.
_LAZY = {
    "_world": ("ACTIVITY_LEVELS", "DEVICES", "GENRES", "PLANS", "REGIONS", "TENURE_BUCKETS",
               "Plays", "World"),
    "_services": ("ENTITY_SERVICES", "Faults", "SimClock", "SimState", "make_app"),
    "_server": ("READY_PREFIX", "RunningWorld", "SimControl", "WorldProcess", "running_world",
                "serve", "services_toml", "spawn_world"),
}
_WHERE = {name: mod for mod, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> _Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


__all__ = [
    # the truth
    "ACTIVITY_LEVELS",
    "DEVICES",
    "GENRES",
    "PLANS",
    "REGIONS",
    "TENURE_BUCKETS",
    "Plays",
    "World",
    # its microservices
    "ENTITY_SERVICES",
    "READY_PREFIX",
    "Faults",
    "RunningWorld",
    "SimClock",
    "SimControl",
    "SimState",
    "WorldProcess",
    "make_app",
    "running_world",
    "serve",
    "services_toml",
    "spawn_world",
]
