"""The scheduler: run every slot of a cadence (``--every 12h`` or ``--cron EXPR``, UTC).

Slots are aligned: ``--every D`` slots are the multiples of ``D`` since the epoch (so ``12h``
gives 00:00 and 12:00 UTC), ``--cron`` slots are the cron expression's times in UTC. A tick runs
the latest slot at or before now through the same operation as ``snapshot run --slot``, so a
committed slot is a no-op and a crashed one resumes.

After downtime the scheduler catches up on the latest missed slot only (the state it captures
would be the same for every earlier one: the services answer with today's state), and says how
many earlier slots were skipped. SIGTERM sets ``stop``: the run in progress stops before its next
chunk, keeps what it staged (the next start resumes it), and the scheduler returns.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from croniter import croniter

from ttstore import US_PER_S, Clock, TimetravelError, format_timestamp, parse_duration, to_datetime

from ._errors import InvalidRunOption, RunInterrupted
from ._manifest import ManifestCache

log = logging.getLogger("snapshotter.schedule")
DEFAULT_RETRY_S = 60.0


@dataclass(frozen=True)
class Cadence:
    """When slots fall: exactly one of ``every_us`` (aligned to the epoch) or ``cron`` (UTC)."""

    every_us: int | None = None
    cron: str | None = None

    def __post_init__(self) -> None:
        if (self.every_us is None) == (self.cron is None):
            raise InvalidRunOption("give exactly one of --every and --cron", field="every")
        if self.every_us is not None and self.every_us <= 0:
            raise InvalidRunOption("--every must be positive", field="every")
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise InvalidRunOption(f"--cron {self.cron!r} is not a cron expression", field="cron")

    @classmethod
    def parse(cls, *, every: str | None = None, cron: str | None = None) -> Cadence:
        """From ``--every 12h`` or ``--cron "0 */12 * * *"``."""
        every_us = None if every is None else parse_duration(every, field="--every")
        return cls(every_us=every_us, cron=cron)

    def describe(self) -> str:
        return f"every {self.every_us // US_PER_S}s" if self.every_us else f"cron {self.cron!r}"

    def slot_at_or_before(self, now_us: int) -> int:
        """The latest slot time ``<= now_us``."""
        if self.every_us is not None:
            return (now_us // self.every_us) * self.every_us
        assert self.cron is not None
        start = to_datetime(now_us) + timedelta(microseconds=1)
        prev = croniter(self.cron, start).get_prev(float)
        return round(prev * US_PER_S)

    def next_slot_after(self, slot_us: int) -> int:
        """The first slot time ``> slot_us``."""
        if self.every_us is not None:
            return (slot_us // self.every_us + 1) * self.every_us
        assert self.cron is not None
        nxt = croniter(self.cron, to_datetime(slot_us)).get_next(float)
        return round(nxt * US_PER_S)

    def slots_between(self, after_us: int, before_us: int, *, limit: int = 100_000) -> int:
        """How many slots fall strictly between two times (capped at ``limit``)."""
        n, s = 0, self.next_slot_after(after_us)
        while s < before_us and n < limit:
            n, s = n + 1, self.next_slot_after(s)
        return n


@dataclass(kw_only=True)
class Scheduler:
    """Runs every slot of ``cadence`` until ``stop`` is set.

    Args:
        run_slot: runs one slot (idempotent); returns an outcome with a ``message``.
        committed_slots: the slots committed so far (to say what catch-up skipped).
        retry_s: wait before retrying a slot whose run failed.
        max_ticks: stop after this many slot runs (tests); None runs forever.
        wait: ``wait(seconds) -> stopped``; default ``stop.wait`` (tests advance a clock).
    """

    cadence: Cadence
    run_slot: Callable[[int], object]
    clock: Clock
    stop: threading.Event
    committed_slots: Callable[[], list[int]] | None = None
    retry_s: float = DEFAULT_RETRY_S
    max_ticks: int | None = None
    wait: Callable[[float], bool] | None = None

    def _wait(self, seconds: float) -> bool:
        return (self.wait or self.stop.wait)(seconds)

    def run_forever(self) -> int:
        """Loop until ``stop`` is set (or ``max_ticks``); returns the number of slots run."""
        log.info("event=schedule_start cadence=%s", self.cadence.describe())
        done: int | None = None
        ticks = 0
        while not self.stop.is_set():
            now = self.clock.now_us()
            slot = self.cadence.slot_at_or_before(now)
            if slot != done:
                self._say_catch_up(slot, done)
                try:
                    outcome = self.run_slot(slot)
                except RunInterrupted:
                    log.info(
                        "event=schedule_stop slot=%s staged chunks are kept; the next start "
                        "resumes this slot", format_timestamp(slot),
                    )
                    break
                except (TimetravelError, OSError) as exc:
                    log.error(
                        "event=run_failed slot=%s error=%s retry_in_s=%.0f",
                        format_timestamp(slot), exc, self.retry_s,
                    )
                    if self._wait(self.retry_s):
                        break
                    continue
                except Exception as exc:  # noqa: BLE001 - a bug or an unwrapped library error
                    # A long-running scheduler outlives it: logged with its traceback, retried.
                    log.exception(
                        "event=run_failed slot=%s error=%r unexpected retry_in_s=%.0f",
                        format_timestamp(slot), exc, self.retry_s,
                    )
                    if self._wait(self.retry_s):
                        break
                    continue
                log.info("event=slot_done %s", getattr(outcome, "message", outcome))
                done = slot
                ticks += 1
                if self.max_ticks is not None and ticks >= self.max_ticks:
                    break
            wait_us = self.cadence.next_slot_after(slot) - self.clock.now_us()
            log.info(
                "event=sleep next_slot=%s in_s=%.1f",
                format_timestamp(self.cadence.next_slot_after(slot)), max(0, wait_us) / US_PER_S,
            )
            if self._wait(max(0.0, wait_us / US_PER_S)):
                break
        log.info("event=schedule_stopped slots_run=%d", ticks)
        return ticks

    def _say_catch_up(self, slot: int, done: int | None) -> None:
        """Say so when ``slot`` is run late: at start-up, or after the process was suspended."""
        last: int | None = done
        if done is not None:
            skipped = self.cadence.slots_between(done, slot)
        else:
            committed = self.committed_slots() if self.committed_slots is not None else []
            if slot in committed:
                return
            before = [s for s in committed if s < slot]
            last = max(before) if before else None
            skipped = self.cadence.slots_between(last, slot) if last is not None else 0
        if done is not None and not skipped:
            return  # the next slot on time
        log.warning(
            "event=catch_up slot=%s catching up on the latest missed slot%s",
            format_timestamp(slot),
            f"; skipping {skipped} earlier missed slot(s) after {format_timestamp(last)}"
            if skipped and last is not None else "",
        )


def committed_slots_of(cache: ManifestCache) -> Callable[[], list[int]]:
    """A ``committed_slots`` callable over a store's manifests."""
    return lambda: [m.slot_us for m in cache.runs()]
