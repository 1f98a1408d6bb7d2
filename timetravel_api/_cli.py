"""Command-line registration for `timetravel_api`. Subcommands are added here as they land."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add this package's commands to the ``timetravel`` dispatcher."""
    _register_api(sub)
    from ._training_cli import register_cli as register_training_set  # noqa: PLC0415

    register_training_set(sub)
    from ._parity_cli import register_cli as register_parity  # noqa: PLC0415

    register_parity(sub)


def _register_api(sub: Any) -> None:
    """``timetravel api serve`` (the query HTTP server)."""
    api = sub.add_parser("api", help="the query HTTP server",
                         description="The query API: point-in-time features over HTTP.")
    asub = api.add_subparsers(dest="api_command", metavar="SUBCOMMAND", required=True)
    from ._server import register_cli  # noqa: PLC0415

    register_cli(asub)
