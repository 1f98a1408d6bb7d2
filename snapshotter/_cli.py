"""``timetravel snapshot ...``: context selection, runs, the scheduler and the run list.

Each subcommand's options and handler live beside its code (``register_*_cli`` in the module);
this only gathers them.
"""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    """Add the ``snapshot`` command group to the ``timetravel`` dispatcher."""
    snapshot: argparse.ArgumentParser = sub.add_parser(
        "snapshot", help="select contexts and snapshot service state",
        description="Snapshots: stratified context selection, snapshot runs, the scheduler "
        "and the list of runs.",
    )
    ssub = snapshot.add_subparsers(dest="snapshot_command", metavar="SUBCOMMAND", required=True)
    from ._select_cli import register_select_cli

    register_select_cli(ssub)
    from ._runcli import register_run_cli

    register_run_cli(ssub)
    del ssub  # subcommands register here, one import and one call each
