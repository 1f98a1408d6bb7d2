"""The logger's counters, as a snapshot (:class:`LoggerStats`) and as Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class LoggerStats:
    """A consistent-enough snapshot of a logger's counters.

    Attributes:
        accepted: facts accepted by ``log()``/``log_batch()``/``append_facts()``.
        durable: facts in a spool group commit that was fsynced.
        written: facts uploaded to the store.
        dropped: facts not kept, by reason (``buffer_full``, ``closed``, ``unknown_fact_type``,
            ``invalid:<code>``). Facts that ``log()`` accepted but the writer found invalid
            count both as accepted and as dropped.
        retries: failed store operations that were (or will be) retried.
        buffered: facts in memory, not yet in the spool.
        spool_bytes: bytes of spool segments not yet uploaded.
        spool_segments: segment files not yet uploaded (open and sealed).
        upload_watermark_us: every fact accepted with ``logged_at`` before it is in the store.
        last_flush_age_s: seconds between the upload watermark and now: how far the store lags
            behind acceptance (about ``group_commit_interval_s`` when idle).
        stuck_segments: sealed segments whose objects already exist with other content; they
            are kept in the spool and reported as errors.
    """

    producer: str
    writer_id: str
    accepted: int
    durable: int
    written: int
    dropped: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    buffered: int = 0
    spool_bytes: int = 0
    spool_segments: int = 0
    upload_watermark_us: int = 0
    last_flush_age_s: float = 0.0
    stuck_segments: int = 0

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


class LoggerCollector(Collector):
    """A Prometheus collector reading a logger's :class:`LoggerStats` at scrape time."""

    def __init__(self, stats: Callable[[], LoggerStats]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # no describe-time reads: the logger may be busy or closed

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        labels = ["producer", "writer_id"]
        lv = [s.producer, s.writer_id]

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            m = CounterMetricFamily(f"timetravel_factlog_{name}", doc, labels=labels)
            m.add_metric(lv, value)
            return m

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            m = GaugeMetricFamily(f"timetravel_factlog_{name}", doc, labels=labels)
            m.add_metric(lv, value)
            return m

        yield counter("accepted", "Facts accepted by the logger.", s.accepted)
        yield counter("durable", "Facts fsynced in the local spool.", s.durable)
        yield counter("written", "Facts uploaded to the store.", s.written)
        dropped = CounterMetricFamily(
            "timetravel_factlog_dropped", "Facts dropped, by reason.",
            labels=[*labels, "reason"],
        )
        for reason, n in sorted(s.dropped.items()):
            dropped.add_metric([*lv, reason], n)
        yield dropped
        yield counter("retries", "Store operations retried.", s.retries)
        yield gauge("buffered_facts", "Facts in memory, not yet spooled.", s.buffered)
        yield gauge("spool_bytes", "Bytes of spool segments not yet uploaded.", s.spool_bytes)
        yield gauge("spool_segments", "Spool segments not yet uploaded.", s.spool_segments)
        yield gauge("stuck_segments", "Segments kept because the store holds other bytes.",
                    s.stuck_segments)
        yield gauge("last_flush_age_seconds",
                    "Seconds since the upload watermark: how far the store lags acceptance.",
                    s.last_flush_age_s)
        yield gauge("upload_watermark_seconds",
                    "The upload watermark, seconds since the epoch.",
                    s.upload_watermark_us / 1e6)
