"""Command-line registration for `simworld`. Subcommands are added here as they land."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add this package's commands to the ``timetravel`` dispatcher (none yet)."""
    del sub
