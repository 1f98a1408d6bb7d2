"""``timetravel facts ...``: the ingest server, compaction and stats.

Each subcommand's options and handler live beside its code (``register_cli`` in the module);
this only gathers them.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    facts: argparse.ArgumentParser = sub.add_parser(
        "facts", help="log, compact and inspect facts",
        description="Facts: the ingest server, compaction and data-quality stats.",
    )
    fsub = facts.add_subparsers(dest="facts_command", metavar="SUBCOMMAND", required=True)
    from . import _server  # noqa: PLC0415

    _server.register_cli(fsub)
    from ._compact import register_cli as compact_cli  # noqa: PLC0415

    compact_cli(fsub)
    from ._stats import register_cli as stats_cli  # noqa: PLC0415

    stats_cli(fsub)
