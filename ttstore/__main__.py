"""``python -m ttstore`` is the ``timetravel`` command (for environments without the script)."""

from ._cli import run

run()
