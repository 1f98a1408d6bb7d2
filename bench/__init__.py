"""Timetravel's benchmarks: ``make bench`` (``python -m bench``) and ``make bench-quick``.

Each ``bench/<name>_bench.py`` module exposes ``run(quick: bool) -> list[Result]``. The harness
(``bench/__main__.py``) runs every module in its own process, prints one table and writes
``bench/results.json``. A figure with a baseline carries the baseline's value, measured in the same
process on the same data, and its target may be a ratio to it::

    from bench import Result, at_least, ratio_at_least

    def run(quick: bool) -> list[Result]:
        ours, theirs = measure_ours(), measure_baseline()
        return [Result("log() dict rows", ours, "facts/s", baseline=theirs,
                       baseline_name="JSON lines", target=ratio_at_least(3.0))]
"""

from ._support import (
    MotoServer,
    Timer,
    free_port,
    moto_server,
    peak_rss_mb,
    percentiles_us,
)
from ._types import Result, Target, at_least, at_most, ratio_at_least, ratio_at_most

__all__ = [
    "MotoServer",
    "Result",
    "Target",
    "Timer",
    "at_least",
    "at_most",
    "free_port",
    "moto_server",
    "peak_rss_mb",
    "percentiles_us",
    "ratio_at_least",
    "ratio_at_most",
]
