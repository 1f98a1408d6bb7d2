"""Compaction: it never changes an answer, commits atomically, races safely with other compactors,
writers and readers, and deletes what it replaced only after the grace period."""

from __future__ import annotations

import json
import tempfile
import threading

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factlog import (
    CompactionConfig,
    Compactor,
    FactReader,
    FactType,
    FactTypeCatalog,
)
from factlog._parquetio import read_files
from factlog._partitions import read_partition
from tests.factdata import DAY, PLAY, T0, H, random_facts, reference_scan, table_rows, write_facts
from ttstore import ManualClock, Store, StoreUnavailable
from ttstore._cli import main

NOW = T0 + 10 * DAY
MIN = 60_000_000


def _ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


QUERIES = [
    {},
    {"entities": [1, 3]},
    {"start_us": T0 + 5 * H, "end_us": T0 + DAY + 7 * H},
    {"logged_before_us": T0 + DAY},
    {"entities": [0, 2, 5], "start_us": T0 + DAY, "logged_before_us": T0 + 2 * DAY + 3 * H},
    {"columns": ["member_id", "video_id", "fact_id"]},
]


def _answers(reader: FactReader) -> list[bytes]:
    return [_ipc(reader.scan("play", **q)) for q in QUERIES]


def _setup(store: Store, *, seed: int = 7, n: int = 300, files: int = 6):
    cat = FactTypeCatalog(store)
    cat.declare(PLAY)
    rows = random_facts(np.random.default_rng(seed), n, n_ids=n // 3)
    for i, chunk in enumerate(np.array_split(np.arange(n), files)):
        write_facts(store, PLAY, [rows[j] for j in chunk], writer=f"w{i % 2}", segment=i,
                    producer=f"p{i % 3}", ingested_at_us=T0 + 9 * DAY + i)
    clock = ManualClock(NOW)
    compactor = Compactor(store, catalog=cat, clock=clock,
                          config=CompactionConfig(row_group_rows=16))
    return FactReader(store, catalog=cat), compactor, clock


def test_compaction_never_changes_a_query_result(store: Store) -> None:
    reader, compactor, clock = _setup(store)
    before = _answers(reader)
    copies_before = reader.scan("play", dedup=False).num_rows
    report = compactor.run()
    t = report.totals()
    assert t["partitions_compacted"] == 3 and t["files_out"] == 3
    assert t["rows_in"] == copies_before and t["rows_out"] == reader.scan("play").num_rows
    assert t["duplicates_removed"] == copies_before - t["rows_out"] > 0
    assert t["conflicts"] > 0
    assert _answers(reader) == before

    # Compacted files are sorted by (entity, event_time, ...) in small row groups.
    for f in reader.live_files("play"):
        assert f.kind == "compacted"
        t_ = read_files(store, [f], PLAY.arrow_schema().remove_metadata())
        assert table_rows(t_) == sorted(table_rows(t_), key=lambda r: (
            r["member_id"], r["event_time"], r["logged_at"], r["fact_id"]))
        fs, root = store.arrow_filesystem()
        with fs.open_input_file(f"{root}/{f.key}") as fh:
            assert pq.ParquetFile(fh).metadata.num_row_groups == -(-t_.num_rows // 16)

    # New copies arrive (some earlier-logged, which now win), and a second round merges
    # compacted with raw files.
    more = random_facts(np.random.default_rng(8), 120, n_ids=100)
    for r in more:
        r["logged_at"] -= 1000
    write_facts(store, PLAY, more, writer="w9", segment=1, producer=None,
                ingested_at_us=T0 + 9 * DAY)
    before2 = _answers(reader)
    assert before2 != before
    clock.advance(MIN)
    assert compactor.run().totals()["partitions_compacted"] == 3
    assert _answers(reader) == before2
    assert len(read_partition(store, "play", "2027-01-01").records) == 2


def test_grace_deletion_and_external_readers(store: Store) -> None:
    reader, compactor, clock = _setup(store, files=4)
    answer = reader.scan("play")
    raw = {f.key for f in reader.live_files("play")}
    copies = reader.scan("play", dedup=False).num_rows
    compactor.run()
    fs, root = store.arrow_filesystem()

    def external() -> pa.Table:
        return ds.dataset(f"{root}/facts/play", filesystem=fs, format="parquet",
                          partitioning="hive").to_table()

    # Between commit and deletion an external reader sees compacted and raw files together.
    assert external().num_rows == answer.num_rows + copies
    clock.advance(59 * MIN)
    assert compactor.run().deleted == []
    clock.advance(MIN)
    report = compactor.run()
    assert sorted(report.deleted) == sorted(raw)
    assert not any(store.exists(k) for k in raw)
    assert reader.scan("play").equals(answer)
    # After the grace period, it needs no deduplication (and skips _compactions/).
    ext = external()
    assert ext.num_rows == answer.num_rows
    assert sorted(ext.column("fact_id").to_pylist()) == sorted(answer.column("fact_id").to_pylist())
    assert compactor.run().deleted == []  # reported once


def test_concurrent_compactors_only_one_commits(store: Store) -> None:
    reader, compactor, clock = _setup(store, files=3)
    answer = reader.scan("play")
    other = Compactor(store, clock=clock)

    class Racing(Compactor):
        def _commit(self, record):  # the other compactor commits between our read and commit
            if record.date == "2027-01-01" and not raced:
                raced.append(other.compact_partition("play", record.date))
            return super()._commit(record)

    raced: list = []
    racing = Racing(store, clock=clock)
    res = racing.compact_partition("play", "2027-01-01")
    assert raced[0].status == "committed"
    assert res.status == "lost_race"
    part = read_partition(store, "play", "2027-01-01")
    assert [r.seq for r in part.records] == [1]
    assert part.orphans == []  # the loser deleted its outputs
    assert [f.name for f in part.live] == list(part.records[0].outputs)
    assert reader.scan("play").equals(answer)


def test_compactors_and_a_writer_in_threads(local_store: Store) -> None:
    store = local_store
    reader, _, clock = _setup(store, files=4, n=200)
    errors: list[BaseException] = []
    extra = random_facts(np.random.default_rng(11), 100, n_ids=300)

    def compact() -> None:
        try:
            c = Compactor(store, clock=clock, config=CompactionConfig(grace_us=0))
            for _ in range(4):
                c.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def write() -> None:
        for i in range(10):
            write_facts(store, PLAY, extra[i * 10:(i + 1) * 10], writer="wx", segment=i)

    threads = [threading.Thread(target=compact) for _ in range(2)]
    threads.append(threading.Thread(target=write))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    # Every fact exactly once, as if nothing had been compacted.
    all_copies = table_rows(reader.scan("play", dedup=False))
    got = table_rows(reader.scan("play"))
    assert got == reference_scan(all_copies, PLAY)
    ids = {(r["member_id"], r["fact_id"]) for r in got}
    assert len(ids) == len(got)
    assert {(r["member_id"], r["fact_id"]) for r in extra} <= ids


def test_raw_file_uploaded_during_compaction_stays_live(store: Store) -> None:
    reader, _, clock = _setup(store, files=2)
    late = [{"member_id": 42, "fact_id": "late", "event_time": T0 + H, "logged_at": T0 + H,
             "video_id": 1}]

    class SlowCompactor(Compactor):
        def _commit(self, record):
            written.extend(write_facts(store, PLAY, late, writer="wl", segment=1))
            return super()._commit(record)

    written: list[str] = []
    SlowCompactor(store, clock=clock).compact_partition("play", "2027-01-01")
    part = read_partition(store, "play", "2027-01-01")
    assert written[0].rsplit("/", 1)[1] not in part.records[0].replaces
    assert written[0] in {f.key for f in part.live}
    assert reader.scan("play", entities=[42]).column("fact_id").to_pylist() == ["late"]


def test_reader_that_listed_before_the_commit(store: Store) -> None:
    reader, compactor, clock = _setup(store, files=3)
    answer = reader.scan("play")
    stale = reader.live_files("play")
    compactor.run()
    # Within the grace period the files it listed are still there.
    schema = PLAY.arrow_schema().remove_metadata()
    copies = read_files(store, stale, schema)
    assert reference_scan(table_rows(copies), PLAY) == table_rows(answer)
    compactor.config = CompactionConfig(grace_us=0)
    assert len(compactor.run().deleted) == len(stale)  # grace 0: deleted now
    assert not any(store.exists(f.key) for f in stale)

    class StaleReader(FactReader):
        calls = 0

        def live_files(self, fact_type, **kw):
            StaleReader.calls += 1
            return stale if StaleReader.calls == 1 else super().live_files(fact_type, **kw)

    assert StaleReader(store).scan("play").equals(answer)
    assert StaleReader.calls == 2


def test_crashed_compaction_leaves_an_orphan_that_is_never_read(store: Store) -> None:
    reader, compactor, clock = _setup(store, files=3)
    answer = reader.scan("play")

    class Crashing(Compactor):
        def _commit(self, record):
            raise StoreUnavailable("connection lost")

    with pytest.raises(StoreUnavailable):
        Crashing(store, clock=clock).compact_partition("play", "2027-01-02")
    part = read_partition(store, "play", "2027-01-02")
    assert len(part.orphans) == 1 and part.records == []
    assert reader.scan("play").equals(answer)
    clock.advance(59 * MIN)
    assert compactor.delete_expired("play", "2027-01-02") == []
    clock.advance(MIN)
    assert compactor.delete_expired("play", "2027-01-02") == [part.orphans[0].key]
    assert reader.scan("play").equals(answer)


def test_cli_compact(local_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    store = local_store
    reader, _, _ = _setup(store, files=3)
    answer = reader.scan("play")
    now = "2027-01-11T00:00:00Z"
    assert main(["facts", "compact", "--store", store.url, "--now", now, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would compact 3 of 3 partitions: 9 files → 3" in out
    assert all(not p.records for p in [read_partition(store, "play", "2027-01-01")])
    assert main(["facts", "compact", "--store", store.url, "--now", now, "--date",
                 "2027-01-02", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["partitions_compacted"] == 1 and rep["files_in"] == 3 and rep["files_out"] == 1
    assert rep["partitions"][0]["date"] == "2027-01-02"
    assert main(["facts", "compact", "--store", store.url, "--now", now, "--grace", "0"]) == 0
    out = capsys.readouterr().out
    assert "compacted 2 of 3 partitions" in out
    assert "deleted 9 files" in out
    assert reader.scan("play").equals(answer)
    assert main(["facts", "compact", "--store", store.url, "--fact-type", "nope"]) == 2
    assert "unknown_fact_type" in capsys.readouterr().err
    assert main(["facts", "compact", "--store", store.url, "--date", "2027-13-01"]) == 2


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), rounds=st.integers(1, 3), grace0=st.booleans())
def test_rounds_of_writes_and_compactions_never_change_answers(seed, rounds, grace0) -> None:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        cat = FactTypeCatalog(store)
        cat.declare(PLAY)
        reader = FactReader(store, catalog=cat)
        clock = ManualClock(NOW)
        compactor = Compactor(store, catalog=cat, clock=clock, config=CompactionConfig(
            grace_us=0 if grace0 else H, row_group_rows=int(rng.integers(1, 20))))
        segment = 0
        for _ in range(rounds):
            for _ in range(int(rng.integers(1, 4))):
                segment += 1
                rows = random_facts(rng, int(rng.integers(1, 40)), n_ids=30)
                write_facts(store, PLAY, rows, writer=f"w{segment % 2}", segment=segment,
                            producer=None if segment % 3 == 0 else f"p{segment % 2}",
                            ingested_at_us=NOW - int(rng.integers(0, 3)))
            before = _answers(reader)
            compactor.run()
            assert _answers(reader) == before
            clock.advance(MIN)


def test_files_with_undeclared_columns_are_never_rewritten(store: Store) -> None:
    reader, compactor, clock = _setup(store, files=2)
    rows = [{"member_id": 9, "fact_id": f"extra{i}", "event_time": T0 + i, "logged_at": T0 + i}
            for i in range(3)]
    k = write_facts(store, PLAY, rows, writer="tmp", segment=1)[0]
    table = store.read_parquet(k)
    store.write_parquet(k.replace("tmp-", "new-"), table.append_column("zzz", pa.array([1, 2, 3])))
    store.delete(k)
    answer = reader.scan("play")
    res = compactor.compact_partition("play", "2027-01-01")
    assert res.status == "schema_mismatch"
    assert read_partition(store, "play", "2027-01-01").records == []
    assert reader.scan("play").equals(answer)
    # Once a version declares the column, compaction keeps it.
    FactTypeCatalog(store).declare(FactType(PLAY.name, entity=PLAY.entity,
                                            fields={**PLAY.fields, "zzz": "int64"}))
    assert compactor.compact_partition("play", "2027-01-01").status == "committed"
    got = FactReader(store).scan("play", entities=[9], columns=["fact_id", "zzz"])
    assert got.to_pydict() == {"fact_id": ["extra0", "extra1", "extra2"], "zzz": [1, 2, 3]}


def test_string_keys_pruned_by_row_group_after_compaction(store: Store) -> None:
    from tests.factdata import PAGE

    cat = FactTypeCatalog(store)
    cat.declare(PAGE)
    users = ["007", "7", "a", "b", "ba", "é", "z"]
    for seg in range(2):
        write_facts(store, PAGE, [{"user": u, "fact_id": f"u{users.index(u)}-{seg}-{i}",
                                   "event_time": T0 + i,
                                   "path": "/", "n": i} for u in users for i in range(3)],
                    writer="w", segment=seg)
    reader = FactReader(store, catalog=cat)
    before = {u: reader.scan("page", entities=[u]) for u in users}
    pair = reader.scan("page", entities=["b", "007"])
    Compactor(store, catalog=cat, clock=ManualClock(NOW),
              config=CompactionConfig(row_group_rows=2)).run()
    assert [f.kind for f in reader.live_files("page")] == ["compacted"]
    for u in users:
        got = reader.scan("page", entities=[u])
        assert got.num_rows == 6 and got.equals(before[u])
    assert reader.scan("page", entities=["b", "007"]).equals(pair)
    assert reader.scan("page", entities=["c", "0"]).num_rows == 0
