"""The scheduler: slots of --every and --cron, catch-up after downtime, retries, stopping."""

from __future__ import annotations

import logging
import threading

import pytest

from snapshotter._errors import InvalidRunOption, RunInterrupted
from snapshotter._schedule import Cadence, Scheduler
from ttstore import US_PER_S, ManualClock, StoreUnavailable, parse_timestamp

H = 3600 * US_PER_S


def ts(text: str) -> int:
    return parse_timestamp(text, field="t")


@pytest.mark.parametrize(
    ("cadence", "now", "slot", "after"),
    [
        (Cadence.parse(every="12h"), "2026-11-20T12:00:00Z", "2026-11-20T12:00:00Z",
         "2026-11-21T00:00:00Z"),
        (Cadence.parse(every="12h"), "2026-11-20T11:59:59.999999Z", "2026-11-20T00:00:00Z",
         "2026-11-20T12:00:00Z"),
        (Cadence.parse(every="1d"), "2026-11-20T23:00:00+02:00", "2026-11-20T00:00:00Z",
         "2026-11-21T00:00:00Z"),
        (Cadence.parse(cron="0 */12 * * *"), "2026-11-20T12:00:00Z", "2026-11-20T12:00:00Z",
         "2026-11-21T00:00:00Z"),
        (Cadence.parse(cron="0 */12 * * *"), "2026-11-20T11:59:59.999999Z",
         "2026-11-20T00:00:00Z", "2026-11-20T12:00:00Z"),
        (Cadence.parse(cron="30 6 * * *"), "2026-11-20T06:29:00Z", "2026-11-19T06:30:00Z",
         "2026-11-20T06:30:00Z"),
        (Cadence.parse(cron="*/15 * * * *"), "2026-11-20T10:44:10.5Z", "2026-11-20T10:30:00Z",
         "2026-11-20T10:45:00Z"),
    ],
)
def test_slots(cadence, now, slot, after):
    assert cadence.slot_at_or_before(ts(now)) == ts(slot)
    assert cadence.next_slot_after(ts(slot)) == ts(after)


def test_bad_cadences():
    with pytest.raises(InvalidRunOption):
        Cadence.parse(cron="not a cron")
    with pytest.raises(InvalidRunOption):
        Cadence.parse()
    with pytest.raises(InvalidRunOption):
        Cadence(every_us=12 * H, cron="0 * * * *")
    with pytest.raises(InvalidRunOption):
        Cadence(every_us=0)


class Harness:
    """A scheduler on a manual clock whose waits advance the clock instead of sleeping."""

    def __init__(self, now: str, committed: list[str],
                 fail: dict[int, list[Exception]] | None = None):
        self.clock = ManualClock(ts(now))
        self.stop = threading.Event()
        self.ran: list[int] = []
        self.waits: list[float] = []
        self.committed = [ts(c) for c in committed]
        self.fail = {k: list(v) for k, v in (fail or {}).items()}

    def run_slot(self, slot: int) -> str:
        self.ran.append(slot)
        errs = self.fail.get(slot)
        if errs:
            raise errs.pop(0)
        self.committed.append(slot)
        return f"ran {slot}"

    def wait(self, seconds: float) -> bool:
        self.waits.append(seconds)
        self.clock.advance(round(seconds * US_PER_S))
        return self.stop.is_set()

    def scheduler(self, cadence: Cadence, max_ticks: int) -> Scheduler:
        return Scheduler(cadence=cadence, run_slot=self.run_slot, clock=self.clock,
                         stop=self.stop, committed_slots=lambda: list(self.committed),
                         retry_s=30.0, max_ticks=max_ticks, wait=self.wait)


def test_catches_up_on_the_latest_missed_slot_and_says_so(caplog):
    h = Harness("2026-11-20T13:00:00Z", committed=["2026-11-19T00:00:00Z"])
    with caplog.at_level(logging.INFO, logger="snapshotter.schedule"):
        ticks = h.scheduler(Cadence.parse(every="12h"), max_ticks=3).run_forever()
    assert ticks == 3
    assert h.ran == [ts("2026-11-20T12:00:00Z"), ts("2026-11-21T00:00:00Z"),
                     ts("2026-11-21T12:00:00Z")]
    catch_up = [r.getMessage() for r in caplog.records if "event=catch_up" in r.getMessage()]
    assert len(catch_up) == 1
    assert "2026-11-20T12:00:00.000000Z" in catch_up[0]
    assert "skipping 2 earlier missed slot(s)" in catch_up[0]
    # It slept until each next slot, exactly.
    assert h.waits[0] == 11 * 3600


def test_a_committed_slot_is_not_a_catch_up(caplog):
    h = Harness("2026-11-20T13:00:00Z", committed=["2026-11-20T12:00:00Z"])
    with caplog.at_level(logging.INFO, logger="snapshotter.schedule"):
        h.scheduler(Cadence.parse(cron="0 */12 * * *"), max_ticks=2).run_forever()
    # The idempotent run is still called for the current slot (a no-op on a committed one).
    assert h.ran == [ts("2026-11-20T12:00:00Z"), ts("2026-11-21T00:00:00Z")]
    assert not [r for r in caplog.records if "event=catch_up" in r.getMessage()]


def test_a_failed_slot_is_retried():
    slot = ts("2026-11-20T12:00:00Z")
    h = Harness("2026-11-20T12:00:05Z", committed=[],
                fail={slot: [StoreUnavailable("down"), StoreUnavailable("down")]})
    h.scheduler(Cadence.parse(every="12h"), max_ticks=1).run_forever()
    assert h.ran == [slot, slot, slot]
    assert h.waits == [30.0, 30.0]


def test_an_unexpected_error_is_logged_with_its_traceback_and_retried(caplog):
    slot = ts("2026-11-20T12:00:00Z")
    h = Harness("2026-11-20T12:00:05Z", committed=[], fail={slot: [RuntimeError("a bug")]})
    with caplog.at_level("ERROR", logger="snapshotter"):
        h.scheduler(Cadence.parse(every="12h"), max_ticks=1).run_forever()
    assert h.ran == [slot, slot]
    assert h.waits == [30.0]
    [rec] = [r for r in caplog.records if "run_failed" in r.getMessage()]
    assert "a bug" in rec.getMessage() and rec.exc_info is not None


def test_stops_on_interrupt_and_on_stop():
    slot = ts("2026-11-20T12:00:00Z")
    h = Harness("2026-11-20T12:00:05Z", committed=[], fail={slot: [RunInterrupted("sigterm")]})
    assert h.scheduler(Cadence.parse(every="12h"), max_ticks=5).run_forever() == 0
    assert h.ran == [slot]
    h2 = Harness("2026-11-20T12:00:05Z", committed=[])
    h2.stop.set()
    assert h2.scheduler(Cadence.parse(every="12h"), max_ticks=5).run_forever() == 0
    assert h2.ran == []


# -- the command, against the simulated world ----------------------------------------------------

import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from simworld import World, running_world  # noqa: E402
from snapshotter import save_selection, select_contexts  # noqa: E402
from snapshotter._manifest import load_manifest, pending_runs  # noqa: E402
from ttstore import ManualClock as _Clock  # noqa: E402
from ttstore import Store  # noqa: E402

CLI = [sys.executable, "-c", "from ttstore._cli import run; run()"]


def _wait_for(cond, proc, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def _stop(proc) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def test_schedule_catches_up_then_stops_gracefully_on_sigterm(tmp_path):
    start = ts("2026-11-01T00:00:00Z")
    world = World(seed=4, members=200, start_us=start)
    store = Store(str(tmp_path / "store"))
    cs = select_contexts(world.population(start), n=40, selected_at_us=start,
                         entity="member_id", seed=2)
    save_selection(store, cs, report=False, clock=_Clock(start))
    with running_world(world) as rw:
        rw.state.clock.set(ts("2026-11-10T10:30:00Z"))
        services = tmp_path / "services.toml"
        services.write_text(rw.services_toml(batch=True))
        base = ["snapshot", "schedule", "--store", store.url, "--services", str(services),
                "--every", "1h", "--chunk-size", "5"]

        # Started at 10:30 with no run of 10:00: that missed slot is run at once, and said so.
        proc = subprocess.Popen([*CLI, *base, "--now", "2026-11-10T10:30:00Z"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        slot10 = ts("2026-11-10T10:00:00Z")
        _wait_for(lambda: load_manifest(store, slot10) is not None, proc)
        code, err = _stop(proc)
        assert code == 0, err
        assert "event=catch_up slot=2026-11-10T10:00:00.000000Z" in err
        assert "event=schedule_stopped slots_run=1" in err
        assert load_manifest(store, slot10).services["profile"].requested == 40

        # SIGTERM in the middle of a run: it stops before its next chunk, keeps what it staged,
        # exits 0, and `snapshot run --slot` finishes the slot later without refetching.
        rw.control.set_faults("*", latency_median_ms=150.0)
        services.write_text(rw.services_toml(batch=False, max_concurrency=1))
        proc = subprocess.Popen([*CLI, *base, "--now", "2026-11-10T11:00:05Z"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        slot11 = ts("2026-11-10T11:00:00Z")
        _wait_for(lambda: any("chunk-" in o.key for o in store.list("snapshots/runs/_staging")),
                  proc)
        code, err = _stop(proc)
        assert code == 0, err
        assert "the next start resumes this slot" in err
        assert load_manifest(store, slot11) is None
        [pending] = pending_runs(store)
        assert pending.plan.slot_us == slot11
        staged = {s: sum(1 for o in store.list("snapshots/runs/_staging")
                         if f"/{s}/chunk-" in o.key) for s in ("profile", "my_list")}
        assert all(0 < n < 8 for n in staged.values()), staged

        rw.control.set_faults("*", latency_median_ms=0.0)
        rw.control.reset_stats()
        r = subprocess.run([*CLI, "snapshot", "run", "--store", store.url, "--services",
                            str(services), "--slot", "2026-11-10T11:00:00Z", "--now",
                            "2026-11-10T11:00:30Z"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert load_manifest(store, slot11) is not None
        asked = rw.control.stats()["services"]
        for s, n in staged.items():
            assert asked[s]["ids_requested"] == 40 - 5 * n
