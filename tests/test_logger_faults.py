"""FactLogger under real faults: S3 stopped mid-run, a logging process killed with SIGKILL, torn
spool tails, retried uploads and conflicting objects. The assertions are about data: nothing
acknowledged is lost, and nothing is written twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from factlog import FactTypeCatalog, FlushTimeout, read_heartbeats
from factlog._spool import Spool, read_frames
from ttstore import ManualClock, Store

from .conftest import MotoServer
from .logger_helpers import (  # noqa: F401  (no_logger_threads_left is an autouse fixture)
    PLAY,
    T0,
    fact_keys,
    id_counts,
    make_logger,
    no_logger_threads_left,
    read_facts,
    row,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.s3
def test_s3_outage_loses_and_duplicates_nothing(moto_server: MotoServer, tmp_path: Path) -> None:
    store = Store(f"s3://{moto_server.create_bucket()}/tt")
    lg = make_logger(store, tmp_path / "spool", segment_max_age_s=0.05)
    flushed: list[str] = []  # accepted before a flush() that returned
    durable: list[str] = []  # confirmed durable by wait_durable
    accepted: list[str] = []
    try:
        for i in range(500):
            fid = f"a-{i}"
            assert lg.log("play", row(i, fact_id=fid))
            accepted.append(fid)
        lg.flush(30)
        flushed.extend(accepted)
        moto_server.stop()
        try:
            for i in range(3000):  # S3 is down: log() keeps accepting, never raises
                fid = f"b-{i}"
                assert lg.log("play", row(10_000 + i, fact_id=fid)) is True
                accepted.append(fid)
                if i % 500 == 499:
                    lg.wait_durable(lg.checkpoint(), 30)
                    durable[:] = accepted
            with pytest.raises(FlushTimeout, match="stay in the spool"):
                lg.flush(0.5)
            deadline = time.monotonic() + 30
            while lg.stats().retries == 0 and time.monotonic() < deadline:
                time.sleep(0.05)  # a refused S3 call takes botocore a second or two to give up
            outage = lg.stats()
        finally:
            moto_server.start()
        lg.flush(60)
        stats = lg.stats()
    finally:
        lg.close()
    assert outage.retries > 0 and outage.spool_segments > 0 and outage.durable == 3500
    assert outage.written == 500
    got = read_facts(store)
    counts = id_counts(got)
    assert all(counts[f] == 1 for f in flushed + durable)
    assert set(counts) == set(accepted) and max(counts.values()) == 1
    assert stats.dropped == {} and stats.written == 3500 and stats.spool_segments == 0
    # The watermark never passed a fact that was still in the spool, and caught up after.
    logged = dict(zip(got.column("fact_id").to_pylist(),
                      got.column("logged_at").cast(pa.int64()).to_pylist(), strict=True))
    assert outage.upload_watermark_us <= min(logged[f] for f in accepted if f.startswith("b-"))
    assert stats.upload_watermark_us >= max(logged.values())
    (hb,) = read_heartbeats(store)
    assert hb.watermark_us >= max(logged.values())


@pytest.mark.s3
def test_store_down_at_construction_declares_in_background(moto_server: MotoServer,
                                                           tmp_path: Path) -> None:
    store = Store(f"s3://{moto_server.create_bucket()}/tt")
    moto_server.stop()
    try:
        lg = make_logger(store, tmp_path / "spool")  # does not fail the service
        for i in range(100):
            assert lg.log("play", row(i))  # uses the given declaration locally
        lg.wait_durable(lg.checkpoint(), 30)
        assert lg.stats().durable == 100
    finally:
        moto_server.start()
    lg.close(60)
    assert FactTypeCatalog(store).get("play") == PLAY
    assert sorted(read_facts(store).column("member_id").to_pylist()) == list(range(100))


def test_sigkill_then_recovery_uploads_exactly_once(local_store: Store, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    child = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "crash_logger_child.py"), local_store.url,
         str(spool)],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )
    try:
        assert child.stdout is not None
        writer_id = json.loads(child.stdout.readline())["writer_id"]
        durable = json.loads(child.stdout.readline())["durable"]
        assert json.loads(child.stdout.readline()) == {"more": 2000}
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert len(durable) == 5000
    before = id_counts(read_facts(local_store))
    assert set(before) == set(durable[:2500])  # flushed by the child; the rest is in the spool
    assert max(before.values()) == 1
    assert [p.suffix for p in (spool / "segments").iterdir()] == [".open"]
    with make_logger(local_store, spool, producer="crashy") as lg:
        assert lg.writer_id == writer_id
        lg.flush(60)
    after = id_counts(read_facts(local_store))
    assert all(after[f] == 1 for f in durable)  # every durable fact, exactly once
    assert max(after.values()) == 1  # nothing written twice, durable or not
    assert set(before) <= set(after)
    assert list((spool / "segments").iterdir()) == []


def test_torn_tail_is_cut_and_the_prefix_recovered(tmp_path: Path) -> None:
    from factlog import rows_to_table

    sp = Spool(tmp_path / "spool")
    seg = sp.new_segment("play")
    tables = []
    for k in range(3):
        t, rej = rows_to_table(PLAY, [row(k * 10 + i) for i in range(10)],
                               logged_at_us=1_800_000_000_000_000 + k, now_us=2 * 10**15 * 900,
                               producer="p")
        assert not rej
        tables.append(t)
        seg.append(t)
    seg.sync()
    good = seg.size_bytes
    seg.close()
    with open(seg.path, "ab") as fh:  # a crash in the middle of the next frame's write
        fh.write(b"TTF1\x00\x01\x02\x03" + b"\xff" * 100)
    sp.release()

    sp2 = Spool(tmp_path / "spool")
    (sealed,) = sp2.recover()
    assert sealed.rows == 30 and sealed.path.suffix == ".sealed"
    assert sealed.path.stat().st_size == good
    got, length = read_frames(sealed.path.read_bytes())
    assert length == good
    assert pa.concat_tables(got).equals(pa.concat_tables(tables))
    sp2.release()


def test_upload_retried_after_crash_before_delete_is_not_duplicated(local_store: Store,
                                                                      tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    lg = make_logger(local_store, spool, segment_max_age_s=3600)
    for i in range(100):
        lg.log("play", row(i))
    lg.wait_durable(lg.checkpoint(), 30)
    (open_seg,) = (spool / "segments").iterdir()
    saved = tmp_path / open_seg.name
    shutil.copy(open_seg, saved)  # the segment as a crash right after its upload would leave it
    lg.close()
    keys = fact_keys(local_store)
    assert len(keys) == 1
    shutil.copy(saved, spool / "segments" / saved.name)
    with make_logger(local_store, spool) as again:
        again.flush(30)
        assert again.stats().stuck_segments == 0
    assert fact_keys(local_store) == keys  # same name: create-if-absent found equal facts
    counts = id_counts(read_facts(local_store))
    assert len(counts) == 100 and max(counts.values()) == 1
    assert list((spool / "segments").iterdir()) == []


def test_conflicting_object_keeps_the_segment(local_store: Store, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    lg = make_logger(local_store, spool, segment_max_age_s=3600)
    try:
        for i in range(10):
            lg.log("play", row(i))
        lg.wait_durable(lg.checkpoint(), 30)
        (open_seg,) = (spool / "segments").iterdir()
        number = int(open_seg.name.split(".")[0])
        other, _ = read_frames(open_seg.read_bytes())
        date = other[0].column("event_time")[0].as_py().strftime("%Y-%m-%d")
        k = f"facts/play/date={date}/{lg.writer_id}-{number:010d}.parquet"
        local_store.write_parquet(k, other[0].slice(0, 3))  # someone else's bytes, same name
        with pytest.raises(FlushTimeout):
            lg.flush(1.0)
        stats = lg.stats()
        assert stats.stuck_segments == 1 and stats.spool_segments == 1
    finally:
        with pytest.raises(FlushTimeout):
            lg.close(0.5)
    sealed = [p.name for p in (spool / "segments").iterdir()]
    assert sealed == [f"{number:010d}.play.sealed"]  # never deleted: nothing is lost
    assert read_facts(local_store).num_rows == 3


def test_close_during_outage_leaves_facts_for_the_next_logger(moto_server: MotoServer,
                                                              tmp_path: Path) -> None:
    store = Store(f"s3://{moto_server.create_bucket()}/tt")
    spool = tmp_path / "spool"
    lg = make_logger(store, spool)
    moto_server.stop()
    try:
        for i in range(200):
            assert lg.log("play", row(i))
        with pytest.raises(FlushTimeout):
            lg.close(0.5)
        assert lg.log("play", row(999)) is False
    finally:
        moto_server.start()
    assert os.listdir(spool / "segments")  # the facts stayed in the spool
    with make_logger(store, spool) as again:
        again.flush(60)
    counts = id_counts(read_facts(store))
    assert len(counts) == 200 and max(counts.values()) == 1


@pytest.mark.s3
def test_unresolvable_type_is_held_not_dropped(moto_server: MotoServer, tmp_path: Path) -> None:
    from factlog import FactType

    store = Store(f"s3://{moto_server.create_bucket()}/tt")
    page = FactType("page", entity=("user", "string"), fields={"path": "string"})
    FactTypeCatalog(store).declare(page)  # known to the store, not given to the logger
    clock = ManualClock(T0)
    lg = make_logger(store, tmp_path / "spool", clock=clock)
    try:
        moto_server.stop()
        try:
            for i in range(50):
                assert lg.log("page", {"user": f"u{i}", "path": "/"})
            seq = lg.checkpoint()
            clock.advance(3_600_000_000)
            with pytest.raises(FlushTimeout):  # held in memory: not durable yet, not dropped
                lg.wait_durable(seq, 0.5)
            held = lg.stats()
            assert held.dropped == {} and held.durable == 0 and held.buffered == 0
            assert held.upload_watermark_us <= T0  # held facts keep the watermark back
        finally:
            moto_server.start()
        lg.wait_durable(seq, 60)
        lg.flush(60)
    finally:
        lg.close()
    got = read_facts(store, "page")
    assert sorted(got.column("user").to_pylist()) == sorted(f"u{i}" for i in range(50))


def test_spool_write_failure_keeps_facts_in_memory(local_store: Store, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    lg = make_logger(local_store, spool)
    try:
        segments = spool / "segments"
        segments.rename(tmp_path / "moved")
        segments.write_text("not a directory")  # every segment create fails: ENOTDIR
        try:
            for i in range(100):
                assert lg.log("play", row(i))
            seq = lg.checkpoint()
            with pytest.raises(FlushTimeout):
                lg.wait_durable(seq, 0.5)
            failing = lg.stats()
            assert failing.durable == 0 and failing.dropped == {} and failing.retries > 0
        finally:
            segments.unlink()
            (tmp_path / "moved").rename(segments)
        lg.wait_durable(seq, 30)
        lg.flush(30)
    finally:
        lg.close()
    counts = id_counts(read_facts(local_store))
    assert len(counts) == 100 and max(counts.values()) == 1
