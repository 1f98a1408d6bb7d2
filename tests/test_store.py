"""The store contract, on every backend: a local directory and S3 on a moto server."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.conftest import MotoServer, free_port
from ttstore import (
    InvalidKey,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    Store,
    StoreUnavailable,
    key,
)
from ttstore._store import LocalBackend, S3Backend

# --- create-if-absent -----------------------------------------------------------------------


def test_put_if_absent_creates_then_refuses(store: Store) -> None:
    store.put_if_absent("a/b/obj.json", b"first")
    assert store.get("a/b/obj.json") == b"first"
    with pytest.raises(ObjectExists) as exc:
        store.put_if_absent("a/b/obj.json", b"second")
    assert exc.value.code == "object_exists"
    assert store.get("a/b/obj.json") == b"first"
    assert store.list("a") == [ObjectInfo("a/b/obj.json", 5)]


def test_put_overwrites(store: Store) -> None:
    store.put("hb/w1.json", b"one")
    store.put("hb/w1.json", b"second")
    assert store.get("hb/w1.json") == b"second"
    with pytest.raises(ObjectExists):
        store.put_if_absent("hb/w1.json", b"third")
    assert store.get("hb/w1.json") == b"second"


def test_concurrent_put_if_absent_has_exactly_one_winner(store: Store) -> None:
    n = 12
    barrier = threading.Barrier(n)
    winners: list[int] = []
    losers: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            store.put_if_absent("race/commit.json", f"writer-{i}".encode())
        except ObjectExists:
            with lock:
                losers.append(i)
        except BaseException as exc:  # reported below
            with lock:
                errors.append(exc)
        else:
            with lock:
                winners.append(i)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(winners) == 1
    assert sorted(winners + losers) == list(range(n))
    assert store.get("race/commit.json") == f"writer-{winners[0]}".encode()


# --- get / exists / list / delete -----------------------------------------------------------


def test_get_exists_delete(store: Store) -> None:
    assert not store.exists("x/y.bin")
    with pytest.raises(ObjectNotFound) as exc:
        store.get("x/y.bin")
    assert exc.value.code == "not_found"
    payload = bytes(range(256)) * 10
    store.put_if_absent("x/y.bin", payload)
    assert store.exists("x/y.bin")
    assert store.get("x/y.bin") == payload
    store.delete("x/y.bin")
    assert not store.exists("x/y.bin")
    with pytest.raises(ObjectNotFound):
        store.get("x/y.bin")
    store.delete("x/y.bin")  # deleting a missing object is not an error
    # After a delete, the key can be created again.
    store.put_if_absent("x/y.bin", b"again")
    assert store.get("x/y.bin") == b"again"


def test_a_prefix_is_not_an_object(store: Store) -> None:
    store.put_if_absent("dir/child.json", b"{}")
    assert not store.exists("dir")
    with pytest.raises(ObjectNotFound):
        store.get("dir")


def test_list_is_recursive_sorted_and_exact_on_prefix(store: Store) -> None:
    objs = {
        "a/b/2.json": b"22",
        "a/b/1.json": b"1",
        "a/b/deep/x/3.json": b"333",
        "a/bc/4.json": b"4444",
        "a/b.json": b"55555",
        "z.json": b"z",
    }
    for k, v in objs.items():
        store.put_if_absent(k, v)
    assert store.list("a/b") == [
        ObjectInfo("a/b/1.json", 1),
        ObjectInfo("a/b/2.json", 2),
        ObjectInfo("a/b/deep/x/3.json", 3),
    ]
    assert store.list("a/b/") == store.list("a/b")
    assert [o.key for o in store.list("a")] == [
        "a/b.json", "a/b/1.json", "a/b/2.json", "a/b/deep/x/3.json", "a/bc/4.json",
    ]
    assert [o.key for o in store.list()] == sorted(objs)
    assert store.list("a/b.json") == [ObjectInfo("a/b.json", 5)]
    assert store.list("nothing/here") == []
    assert store.list("a/b/dee") == []  # not a prefix of a path component
    assert list(store.iter_keys("a", ".json")) == [o.key for o in store.list("a")]


def test_list_of_an_empty_store(store: Store) -> None:
    assert store.list() == []
    assert store.list("facts") == []


# --- parquet ----------------------------------------------------------------------------------


def _table(n: int = 1000, offset: int = 0) -> pa.Table:
    return pa.table({
        "id": pa.array(range(offset, offset + n), pa.int64()),
        "name": pa.array([f"n{i % 17}" for i in range(n)], pa.string()),
        "x": pa.array([i * 0.5 for i in range(n)], pa.float64()),
        "tags": pa.array([[i, i + 1] for i in range(n)], pa.list_(pa.int64())),
    })


def test_parquet_round_trip_is_zstd(store: Store) -> None:
    t = _table()
    size = store.write_parquet("facts/t/date=2026-01-01/w-0000000001.parquet", t)
    raw = store.get("facts/t/date=2026-01-01/w-0000000001.parquet")
    assert size == len(raw)
    meta = pq.ParquetFile(io.BytesIO(raw)).metadata
    assert meta.num_rows == 1000
    compressions = {
        meta.row_group(g).column(c).compression
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
    }
    assert compressions == {"ZSTD"}
    back = store.read_parquet("facts/t/date=2026-01-01/w-0000000001.parquet")
    assert back.equals(t)
    assert store.read_parquet(
        "facts/t/date=2026-01-01/w-0000000001.parquet", columns=["x", "id"]
    ).column_names == ["x", "id"]


def test_write_parquet_is_create_if_absent_and_deterministic(store: Store) -> None:
    t = _table(50)
    store.write_parquet("p/one.parquet", t)
    store.write_parquet("p/two.parquet", t)
    # A retried write of the same table produces the same bytes (same name, same object).
    assert store.get("p/one.parquet") == store.get("p/two.parquet")
    with pytest.raises(ObjectExists):
        store.write_parquet("p/one.parquet", _table(3))
    assert store.read_parquet("p/one.parquet").num_rows == 50


def test_row_group_size_is_honoured(store: Store) -> None:
    store.write_parquet("p/rg.parquet", _table(1000), row_group_size=100)
    assert pq.ParquetFile(io.BytesIO(store.get("p/rg.parquet"))).metadata.num_row_groups == 10


def test_arrow_filesystem_scans_committed_data_and_skips_staged(store: Store) -> None:
    store.write_parquet("facts/t/date=2026-01-01/w-0000000001.parquet", _table(10, 0))
    store.write_parquet("facts/t/date=2026-01-02/w-0000000002.parquet", _table(5, 100))
    # Staged data lives under "_"-prefixed components; scans must not see it.
    store.write_parquet("facts/t/date=2026-01-01/_compactions/staged.parquet", _table(7, 500))
    store.write_parquet("facts/t/_staging/date=2026-01-03/x.parquet", _table(3, 900))
    store.write_parquet("facts/t/date=2026-01-02/_uncommitted.parquet", _table(4, 700))
    fs, root = store.arrow_filesystem()
    dataset = ds.dataset(f"{root}/facts/t", filesystem=fs, format="parquet", partitioning="hive")
    got = dataset.to_table().sort_by("id")
    assert got.column("id").to_pylist() == list(range(10)) + list(range(100, 105))
    assert sorted(set(got.column("date").to_pylist())) == ["2026-01-01", "2026-01-02"]
    # pyarrow can read a single object directly too.
    one = pq.read_table(
        f"{root}/facts/t/date=2026-01-02/w-0000000002.parquet", filesystem=fs
    )
    assert one.column("id").to_pylist() == list(range(100, 105))


# --- local backend specifics -------------------------------------------------------------------


def test_local_put_if_absent_links_a_complete_temp_file(
    local_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = local_store.backend
    assert isinstance(backend, LocalBackend)
    final = backend.root / "c" / "commit.json"
    opened: list[tuple[str, int]] = []
    linked: list[tuple[str, str]] = []
    real_open, real_link = os.open, os.link

    def spy_open(path: os.PathLike[str] | str, flags: int, *a: object, **kw: object) -> int:
        opened.append((os.fspath(path), flags))
        return real_open(path, flags, *a, **kw)  # type: ignore[arg-type]

    def spy_link(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        with open(src, "rb") as fh:  # the temp file is complete before it gets the final name
            assert fh.read() == b"x" * 100_000
        linked.append((os.fspath(src), os.fspath(dst)))
        real_link(src, dst)

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "link", spy_link)
    local_store.put_if_absent("c/commit.json", b"x" * 100_000)
    monkeypatch.undo()

    writes = [p for p, flags in opened if flags & (os.O_WRONLY | os.O_RDWR)]
    assert str(final) not in writes, "the final name must never be opened for writing"
    assert len(linked) == 1 and linked[0][1] == str(final)
    assert Path(linked[0][0]).parent == final.parent
    assert final.read_bytes() == b"x" * 100_000
    assert final.stat().st_nlink == 1  # the temp name is gone
    assert sorted(p.name for p in final.parent.iterdir()) == ["commit.json"]


def test_local_failed_write_leaves_nothing(
    local_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = local_store.backend
    assert isinstance(backend, LocalBackend)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        local_store.put_if_absent("d/obj.bin", b"partial?")
    monkeypatch.undo()
    assert not local_store.exists("d/obj.bin")
    assert list((backend.root / "d").iterdir()) == []
    assert local_store.list() == []


def test_local_refused_create_leaves_no_temp_file(local_store: Store) -> None:
    local_store.put_if_absent("e/obj.bin", b"1")
    for _ in range(3):
        with pytest.raises(ObjectExists):
            local_store.put_if_absent("e/obj.bin", b"2")
    backend = local_store.backend
    assert isinstance(backend, LocalBackend)
    assert [p.name for p in (backend.root / "e").iterdir()] == ["obj.bin"]


def test_local_readers_never_see_a_partial_object(local_store: Store) -> None:
    backend = local_store.backend
    assert isinstance(backend, LocalBackend)
    payloads = {f"r/obj{i}.bin": bytes([i]) * 2_000_000 for i in range(8)}
    seen: dict[str, int] = {}
    bad: list[str] = []
    done = threading.Event()

    def reader() -> None:
        while not done.is_set():
            for k, v in payloads.items():
                try:
                    data = local_store.get(k)
                except ObjectNotFound:
                    continue
                seen[k] = seen.get(k, 0) + 1
                if data != v:
                    bad.append(f"{k}: {len(data)} bytes")

    t = threading.Thread(target=reader)
    t.start()
    try:
        for k, v in payloads.items():
            local_store.put_if_absent(k, v)
    finally:
        done.set()
        t.join()
    assert bad == []
    assert {k for k, _ in ((o.key, o.size) for o in local_store.list("r"))} == set(payloads)


# --- keys ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "components",
    [
        ("..",),
        ("../x",),
        ("facts", ".."),
        ("facts", "../x"),
        ("a/../b",),
        ("..x",),
        (".",),
        ("./a",),
        ("",),
        ("facts", ""),
        ("/abs",),
        ("/etc/passwd",),
        ("a//b",),
        ("a/",),
        (".hidden",),
        ("a b",),
        ("a\\b",),
        ("a\x00b",),
        ("play\n",),
        ("facts", "x\n"),
        ("naïve",),
        ("x" * 256,),
        ("-rf",),
    ],
)
def test_key_rejects_unsafe_components(components: tuple[str, ...]) -> None:
    with pytest.raises(InvalidKey) as exc:
        key(*components)
    assert exc.value.code == "invalid_key"
    assert exc.value.http_status == 400


def test_key_accepts_the_layout() -> None:
    assert key("facts", "play", "date=2026-01-01", "w1-0000000001.parquet") == (
        "facts/play/date=2026-01-01/w1-0000000001.parquet"
    )
    assert key("catalog/fact_types", "play", "v000001.json") == (
        "catalog/fact_types/play/v000001.json"
    )
    assert key("_staging", "a.b..c") == "_staging/a.b..c"
    assert key("x" * 255) == "x" * 255


# --- URLs ------------------------------------------------------------------------------------


def test_store_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Store(f"file://{tmp_path}/a")
    assert isinstance(s.backend, LocalBackend) and s.is_local
    assert s.backend.root == (tmp_path / "a").resolve()
    s.put_if_absent("k.json", b"1")
    assert (tmp_path / "a" / "k.json").read_bytes() == b"1"

    p = Store(str(tmp_path / "b"))
    assert isinstance(p.backend, LocalBackend) and p.backend.root == (tmp_path / "b").resolve()
    assert Store(tmp_path / "c").backend.root == (tmp_path / "c").resolve()  # type: ignore[attr-defined]

    monkeypatch.chdir(tmp_path)
    rel = Store("rel/dir")
    rel.put_if_absent("k.json", b"2")
    assert (tmp_path / "rel" / "dir" / "k.json").read_bytes() == b"2"
    default = Store()
    assert default.backend.root == (tmp_path / "timetravel-data").resolve()  # type: ignore[attr-defined]


def test_s3_url_form(moto_server: MotoServer) -> None:
    s = Store("s3://some-bucket/deep/prefix/")
    assert isinstance(s.backend, S3Backend) and not s.is_local
    assert (s.backend.bucket, s.backend.prefix) == ("some-bucket", "deep/prefix")
    bare = Store("s3://some-bucket")
    assert isinstance(bare.backend, S3Backend) and bare.backend.prefix == ""


@pytest.mark.parametrize("url", ["http://example.com/x", "gs://bucket/x", "s3://", "s3:///x",
                                 "file://otherhost/x"])
def test_bad_store_urls_are_rejected(url: str) -> None:
    with pytest.raises(InvalidKey) as exc:
        Store(url)
    assert exc.value.field == "store"


def test_s3_prefixes_isolate_stores(moto_server: MotoServer) -> None:
    bucket = moto_server.create_bucket()
    a, b, whole = Store(f"s3://{bucket}/a"), Store(f"s3://{bucket}/ab"), Store(f"s3://{bucket}")
    a.put_if_absent("k.json", b"a")
    b.put_if_absent("k.json", b"b")
    assert a.list() == [ObjectInfo("k.json", 1)]
    assert b.list() == [ObjectInfo("k.json", 1)]
    assert [o.key for o in whole.list()] == ["a/k.json", "ab/k.json"]
    assert whole.get("ab/k.json") == b"b"


def test_aws_endpoint_url_is_honoured(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = moto_server.create_bucket()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing there
    dead = Store(f"s3://{bucket}/p")
    with pytest.raises(StoreUnavailable):
        dead.put_if_absent("k.json", b"1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    live = Store(f"s3://{bucket}/p")
    live.put_if_absent("k.json", b"1")
    raw = boto3.client("s3", endpoint_url=moto_server.endpoint)
    assert raw.get_object(Bucket=bucket, Key="p/k.json")["Body"].read() == b"1"


def test_missing_bucket_is_a_store_error(moto_server: MotoServer) -> None:
    s = Store("s3://no-such-bucket-here/p")
    with pytest.raises(Exception) as exc:
        s.put_if_absent("k.json", b"1")
    assert getattr(exc.value, "code", None) == "no_such_bucket"


# --- S3 specifics ----------------------------------------------------------------------------


def test_s3_multipart_conditional_put(
    moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIMETRAVEL_MULTIPART_THRESHOLD_BYTES", "1024")
    bucket = moto_server.create_bucket()
    s = Store(f"s3://{bucket}/mp")  # reads the threshold at construction
    assert isinstance(s.backend, S3Backend) and s.backend.multipart_threshold_bytes == 1024
    first = os.urandom(200_000)
    s.put_if_absent("big.bin", first)
    raw = boto3.client("s3", endpoint_url=moto_server.endpoint)
    head = raw.head_object(Bucket=bucket, Key="mp/big.bin")
    assert head["ETag"].strip('"').endswith("-1"), "not uploaded in parts"
    assert s.get("big.bin") == first
    # A second create through the multipart path is refused, which moto does only when the
    # CompleteMultipartUpload request carries If-None-Match: * (it overwrites otherwise).
    with pytest.raises(ObjectExists):
        s.put_if_absent("big.bin", os.urandom(300_000))
    assert s.get("big.bin") == first
    # The refused upload was aborted: nothing is left in progress.
    assert raw.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # Small objects still go through a single conditional PutObject.
    s.put_if_absent("small.bin", b"tiny")
    assert not raw.head_object(Bucket=bucket, Key="mp/small.bin")["ETag"].strip('"').count("-")
    with pytest.raises(ObjectExists):
        s.put_if_absent("small.bin", b"other")


def test_s3_multipart_without_the_header_would_overwrite(moto_server: MotoServer) -> None:
    """The control for the test above: moto really does overwrite on an unconditional complete,
    so a refusal there can only come from the header."""
    bucket = moto_server.create_bucket()
    raw = boto3.client("s3", endpoint_url=moto_server.endpoint)
    raw.put_object(Bucket=bucket, Key="k", Body=b"first")
    mpu = raw.create_multipart_upload(Bucket=bucket, Key="k")
    part = raw.upload_part(Bucket=bucket, Key="k", UploadId=mpu["UploadId"], PartNumber=1,
                           Body=b"second")
    raw.complete_multipart_upload(
        Bucket=bucket, Key="k", UploadId=mpu["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )
    assert raw.get_object(Bucket=bucket, Key="k")["Body"].read() == b"second"


def test_s3_outage_is_store_unavailable_and_recovers(moto_server: MotoServer) -> None:
    s = Store(f"s3://{moto_server.create_bucket()}/o")
    s.put_if_absent("before.json", b"1")
    moto_server.stop()
    try:
        with pytest.raises(StoreUnavailable) as e1:
            s.put_if_absent("during.json", b"2")
        assert e1.value.code == "store_unavailable" and e1.value.http_status == 503
        with pytest.raises(StoreUnavailable):  # readers too (each failing call costs ~1 s)
            s.list()
    finally:
        moto_server.start()
    assert s.get("before.json") == b"1"
    assert not s.exists("during.json")  # nothing half-written during the outage
    s.put_if_absent("during.json", b"2")
    assert [o.key for o in s.list()] == ["before.json", "during.json"]
