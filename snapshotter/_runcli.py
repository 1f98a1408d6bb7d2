"""``timetravel snapshot run | schedule | list``: options, progress, and output."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ttstore import (
    Clock,
    Store,
    add_common_options,
    clock_from_now,
    format_timestamp,
    open_store,
    parse_timestamp,
)

from ._errors import InvalidRunOption
from ._manifest import ManifestCache, pending_runs
from ._run import DEFAULT_CHUNK_SIZE, SnapshotRunner, parse_shard, use_system_allocator
from ._schedule import Cadence, Scheduler, committed_slots_of
from ._stage import ChunkEvent

log = logging.getLogger("snapshotter.run")
_MINUTE_US = 60_000_000
LOG_EVERY_S = 5.0


def register_run_cli(ssub: Any) -> None:
    """Add ``run``, ``schedule`` and ``list`` to the ``snapshot`` group."""
    run: argparse.ArgumentParser = ssub.add_parser(
        "run", help="one snapshot run (a slot); resumes a crashed one",
        description="Fetch every service for the slot's context set, stage the answers, and "
        "commit the run atomically. Running a committed slot again is a no-op (exit 0).",
    )
    add_common_options(run, now=True)
    run.add_argument("--slot", metavar="RFC3339", help="the slot (UTC); default: the latest "
                     "slot of --every/--cron at or before now, else now truncated to the minute")
    _cadence_options(run, required=False)
    run.add_argument("--shard", metavar="i/n", help="run shard i of n (0-based; e.g. "
                     "$JOB_COMPLETION_INDEX/4); default: every shard not yet committed")
    run.add_argument("--selection", metavar="ID", help="context set; default: the latest one "
                     "not after now (pinned for the slot by its first shard)")
    _run_options(run)
    run.add_argument("--json", action="store_true", help="print the outcome as JSON")
    run.set_defaults(handler=_run)

    sched: argparse.ArgumentParser = ssub.add_parser(
        "schedule", help="long-running: run every slot of a cadence",
        description="Run each slot of --every or --cron (UTC) as `snapshot run --slot` would. "
        "Catches up on the latest missed slot after downtime; SIGTERM stops gracefully.",
    )
    add_common_options(sched, now=True)
    _cadence_options(sched, required=True)
    sched.add_argument("--shard", metavar="i/n", help="run shard i of n of every slot (one "
                       "scheduler per shard); default: the whole run")
    _run_options(sched)
    sched.add_argument("--retry-s", type=float, default=60.0, help="wait before retrying a "
                       "failed slot (60)")
    sched.set_defaults(handler=_schedule)

    lst: argparse.ArgumentParser = ssub.add_parser(
        "list", help="list the snapshot runs",
        description="Committed runs (slot, selection, services, confidence, committed_at) and "
        "pending ones (planned but not committed: running, crashed, or missing shards).",
    )
    add_common_options(lst)
    lst.add_argument("--json", action="store_true", help="one JSON object per run")
    lst.set_defaults(handler=_list)


def _cadence_options(p: argparse.ArgumentParser, *, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--every", metavar="DURATION", help="slots every DURATION (e.g. 12h), "
                   "aligned to the epoch")
    g.add_argument("--cron", metavar="EXPR", help='slots at a cron expression (UTC), e.g. '
                   '"0 */12 * * *"')


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--services", metavar="PATH", help="services TOML (SPEC §2); default: the "
                   "snapshot services the feature repo (--repo) declares")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                   help=f"contexts per staged chunk ({DEFAULT_CHUNK_SIZE})")


def _services(args: argparse.Namespace) -> dict[str, Any]:
    """The services of ``--services``, else those the feature repo declares (SPEC §2)."""
    if args.services:
        from ._services import load_services

        services: dict[str, Any] = load_services(args.services)
        return services
    if not args.repo:
        raise InvalidRunOption("no services: pass --services PATH (a TOML file), or a feature "
                               "repo (--repo PATH or TIMETRAVEL_REPO) that declares them",
                               field="services")
    # The repo loader lives with the engine, which builds on this package: imported late.
    from timetravel_api import FeatureRepo  # noqa: PLC0415

    repo = FeatureRepo.load(args.repo)
    if not repo.services:
        raise InvalidRunOption(f"the feature repo {args.repo} declares no snapshot services; "
                               "pass --services PATH", field="services")
    return dict(repo.services)


@contextmanager
def _stop_on_sigterm() -> Iterator[threading.Event]:
    """An event set by SIGTERM (and SIGINT) while the block runs, in the main thread."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: object) -> None:
        del frame
        if stop.is_set():
            raise KeyboardInterrupt  # a second signal: stop now
        log.warning("event=signal signal=%s stopping before the next chunk",
                    signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[ChunkEvent], None]]:
    """A rich progress bar per (service, shard) on a terminal; else throttled log lines."""
    if enabled and sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        tasks: dict[tuple[str, int], Any] = {}
        with Progress("[bold]{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), transient=False) as bar:

            def on_chunk(ev: ChunkEvent) -> None:
                k = (ev.service, ev.shard)
                if k not in tasks:
                    tasks[k] = bar.add_task(f"{ev.service} shard {ev.shard}", total=ev.chunks)
                bar.advance(tasks[k])

            yield on_chunk
        return
    last: dict[tuple[str, int], float] = {}
    done: dict[tuple[str, int], int] = {}

    def log_chunk(ev: ChunkEvent) -> None:
        k = (ev.service, ev.shard)
        done[k] = done.get(k, 0) + 1
        now = time.monotonic()
        if done[k] == ev.chunks or now - last.get(k, 0.0) >= LOG_EVERY_S:
            last[k] = now
            s = ev.summary
            log.info(
                "event=chunk service=%s shard=%d chunks_done=%d chunks=%d rows=%d ok=%d "
                "missing=%d failed=%d resumed=%s",
                ev.service, ev.shard, done[k], ev.chunks, s.rows, s.ok, s.missing, s.failed,
                str(ev.resumed).lower(),
            )

    yield log_chunk


def _default_slot(args: argparse.Namespace, clock: Clock) -> int:
    if args.slot:
        return parse_timestamp(args.slot, field="--slot")
    now = clock.now_us()
    if args.every or args.cron:
        return Cadence.parse(every=args.every, cron=args.cron).slot_at_or_before(now)
    return now - now % _MINUTE_US


def _runner(args: argparse.Namespace, store: Store, clock: Clock, stop: threading.Event,
            on_chunk: Callable[[ChunkEvent], None]) -> SnapshotRunner:
    use_system_allocator()
    return SnapshotRunner(store, _services(args), clock=clock, chunk_size=args.chunk_size,
                          on_chunk=on_chunk, stop=stop)


def _run(args: argparse.Namespace) -> int:
    store = open_store(args)
    clock = clock_from_now(args.now)
    shard, shards = parse_shard(args.shard) if args.shard else (None, None)
    slot = _default_slot(args, clock)
    with _stop_on_sigterm() as stop, _progress(True) as on_chunk:
        runner = _runner(args, store, clock, stop, on_chunk)
        outcome = runner.run(slot, shard=shard, shards=shards, selection_id=args.selection)
    if args.json:
        body: dict[str, Any] = {
            "state": outcome.state,
            "slot": format_timestamp(outcome.slot_us),
            "run_id": outcome.run_id,
            "missing_shards": outcome.missing_shards,
            "message": outcome.message,
        }
        if outcome.manifest is not None:
            body["manifest"] = json.loads(outcome.manifest.to_json())
        print(json.dumps(body, indent=1))
    else:
        print(outcome.message)
    return 0


def _schedule(args: argparse.Namespace) -> int:
    store = open_store(args)
    clock = clock_from_now(args.now)
    cadence = Cadence.parse(every=args.every, cron=args.cron)
    shard, shards = parse_shard(args.shard) if args.shard else (None, None)
    with _stop_on_sigterm() as stop, _progress(False) as on_chunk:
        runner = _runner(args, store, clock, stop, on_chunk)
        Scheduler(
            cadence=cadence,
            run_slot=functools.partial(runner.run, shard=shard, shards=shards),
            clock=clock,
            stop=stop,
            committed_slots=committed_slots_of(ManifestCache(store)),
            retry_s=args.retry_s,
        ).run_forever()
    return 0


def list_runs(store: Store) -> list[dict[str, Any]]:
    """Every run, committed or pending, oldest slot first, as ``snapshot list --json`` prints."""
    out: list[dict[str, Any]] = []
    for m in ManifestCache(store).runs():
        out.append({
            "slot": format_timestamp(m.slot_us),
            "state": "committed",
            "run_id": m.run_id,
            "selection_id": m.selection_id,
            "shards": m.shards,
            "missing_shards": [],
            "started_at": format_timestamp(m.started_at_us),
            "last_write_at": None,
            "committed_at": format_timestamp(m.committed_at_us),
            "services": {s: {"confidence": v.confidence, "requested": v.requested,
                             "fetched_ok": v.fetched_ok, "failed": v.failed}
                         for s, v in sorted(m.services.items())},
        })
    for p in pending_runs(store):
        out.append({
            "slot": format_timestamp(p.plan.slot_us),
            "state": "pending",
            "run_id": p.plan.run_id,
            "selection_id": p.plan.selection_id,
            "shards": p.plan.shards,
            "missing_shards": p.missing_shards,
            "started_at": format_timestamp(p.plan.created_at_us),
            "last_write_at": (None if p.last_write_us is None
                              else format_timestamp(p.last_write_us)),
            "committed_at": None,
            "services": dict.fromkeys(sorted(p.plan.services)),
        })
    out.sort(key=lambda r: (r["slot"], r["state"]))
    return out


def _list(args: argparse.Namespace) -> int:
    runs = list_runs(open_store(args))
    if args.json:
        for r in runs:
            print(json.dumps(r))
        return 0
    print(f"{'SLOT':27} {'STATE':9} {'RUN_ID':27} {'SELECTION':35} {'COMMITTED_AT':27} "
          "SERVICES (confidence) / MISSING SHARDS")
    for r in runs:
        if r["state"] == "committed":
            detail = " ".join(f"{s}={v['confidence']:.3f}" for s, v in r["services"].items())
        else:
            missing = ",".join(map(str, r["missing_shards"]))
            detail = (
                f"incomplete: shard(s) {missing} of {r['shards']} not committed"
                if missing else "every part committed; the next run of this slot commits it"
            )
            if r["last_write_at"]:
                detail += f"; last write at {r['last_write_at']}"
        print(f"{r['slot']:27} {r['state']:9} {r['run_id']:27} {r['selection_id']:35} "
              f"{r['committed_at'] or '-':27} {detail}")
    return 0
