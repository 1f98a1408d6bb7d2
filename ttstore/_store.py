"""The store: one URL, one place where bytes meet a filesystem.

Nothing else in Timetravel calls boto, s3fs or the OS filesystem for store data. Keys are
``/``-separated relative paths, built only from components checked by :func:`key`.

Publishing follows one rule: write immutable objects first, then make them visible by creating
one small object with :meth:`Store.put_if_absent` (a conditional put on S3, ``os.link`` locally).
"""

from __future__ import annotations

import io
import os
import re
import uuid
from collections.abc import Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ._config import DEFAULT_STORE, ENV_AWS_ENDPOINT_URL, ENV_MULTIPART_THRESHOLD
from ._errors import InvalidKey, ObjectExists, ObjectNotFound, StoreError, StoreUnavailable
from ._listing import DirectoryCache, Listing, ObjectInfo, unchanged

_Names = list[str]  # (``list`` is a method name in the classes below)
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=\-]{0,254}$")
DEFAULT_MULTIPART_THRESHOLD_BYTES = 64 * 1024 * 1024
_PART_BYTES = 16 * 1024 * 1024


def key(*components: str) -> str:
    """Join checked path components into a store key.

    Every component must match ``[A-Za-z0-9_][A-Za-z0-9_.=-]*`` and must not be ``.`` or ``..``,
    so a key built from user input can never escape its prefix.

    Raises:
        InvalidKey: for an empty, ``..``-like or otherwise unsafe component.
    """
    for c in components:
        for part in c.split("/"):
            if not _COMPONENT.fullmatch(part) or part in (".", "..") or part.startswith(".."):
                raise InvalidKey(f"unsafe store key component {part!r}", field="key")
    return "/".join(components)


class Backend(Protocol):
    """What a storage backend must do. Keys are relative to the store root."""

    def put_if_absent(self, key: str, data: bytes) -> None: ...
    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[ObjectInfo]: ...
    def listing(self, prefix: str) -> Listing: ...
    def subdirs(self, prefix: str) -> tuple[_Names, Hashable | None]: ...
    def delete(self, key: str) -> None: ...
    def arrow_fs(self) -> tuple[pafs.FileSystem, str]: ...


class LocalBackend:
    """A directory. Create-if-absent is a temp file, fsync, then ``os.link`` into place, so the
    final name never exposes a partial file."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._dirs = DirectoryCache()

    def _path(self, k: str) -> Path:
        return self.root / k

    def _write_tmp(self, final: Path, data: bytes) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f"_tmp.{uuid.uuid4().hex}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb", closefd=True) as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _fsync_dir(self, d: Path) -> None:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put_if_absent(self, k: str, data: bytes) -> None:
        final = self._path(k)
        tmp = self._write_tmp(final, data)
        try:
            os.link(tmp, final)
        except FileExistsError as exc:
            raise ObjectExists(f"{k} already exists") from exc
        finally:
            tmp.unlink(missing_ok=True)
        self._fsync_dir(final.parent)

    def put(self, k: str, data: bytes) -> None:
        final = self._path(k)
        tmp = self._write_tmp(final, data)
        os.replace(tmp, final)
        self._fsync_dir(final.parent)

    def get(self, k: str) -> bytes:
        try:
            return self._path(k).read_bytes()
        except (FileNotFoundError, IsADirectoryError) as exc:  # a prefix is not an object
            raise ObjectNotFound(f"{k} not found") from exc

    def exists(self, k: str) -> bool:
        return self._path(k).is_file()

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            st = base.stat()
            return [ObjectInfo(prefix, st.st_size, st.st_mtime_ns // 1000)]
        # os.scandir with plain strings: the query server lists partitions on every request.
        out: list[ObjectInfo] = []
        skip = len(str(self.root)) + 1
        stack = [str(base)]
        while stack:
            try:
                it = os.scandir(stack.pop())
            except (FileNotFoundError, NotADirectoryError):
                continue  # deleted while we walked
            with it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                        continue
                    if e.name.startswith("_tmp.") or e.is_dir():  # a link to a directory
                        continue
                    try:
                        st = e.stat()
                    except FileNotFoundError:
                        continue  # deleted while we walked
                    out.append(ObjectInfo(e.path[skip:].replace(os.sep, "/"), st.st_size,
                                          st.st_mtime_ns // 1000))
        out.sort(key=lambda o: o.key)
        return out

    def listing(self, prefix: str) -> Listing:
        return self._dirs.listing(str(self.root), prefix.rstrip("/"))

    def subdirs(self, prefix: str) -> tuple[_Names, Hashable | None]:
        return self._dirs.children(str(self.root), prefix.rstrip("/"))

    def delete(self, k: str) -> None:
        self._path(k).unlink(missing_ok=True)

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), str(self.root)


class S3Backend:
    """An S3 bucket and prefix, through s3fs's client.

    Conditional puts call the S3 API directly with ``IfNoneMatch="*"`` (on ``PutObject``, and on
    ``CompleteMultipartUpload`` for large objects), because that is the only way to be sure the
    header is sent.
    """

    def __init__(self, bucket: str, prefix: str) -> None:
        import s3fs  # noqa: PLC0415  (import cost only for S3 users)

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        endpoint = os.environ.get(ENV_AWS_ENDPOINT_URL) or None
        self._endpoint = endpoint
        self.fs = s3fs.S3FileSystem(
            endpoint_url=endpoint,
            use_listings_cache=False,
            skip_instance_cache=True,
            config_kwargs={
                "connect_timeout": 3,
                "read_timeout": 30,
                "retries": {"max_attempts": 2, "mode": "standard"},
            },
        )
        self.multipart_threshold_bytes = int(
            os.environ.get(ENV_MULTIPART_THRESHOLD, DEFAULT_MULTIPART_THRESHOLD_BYTES)
        )

    def _key(self, k: str) -> str:
        return f"{self.prefix}/{k}" if self.prefix else k

    def _call(self, method: str, **kwargs: Any) -> Any:
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, **kwargs)
        except FileNotFoundError as exc:
            raise _not_found(exc, str(kwargs.get("Key"))) from exc
        except FileExistsError as exc:  # s3fs's translation of 412 PreconditionFailed
            raise ObjectExists(f"{kwargs.get('Key')} already exists") from exc
        except PermissionError as exc:
            raise StoreError(f"access denied: {exc}", code="store_access_denied") from exc
        except Exception as exc:
            raise _translate(exc, str(kwargs.get("Key", ""))) from exc

    def put_if_absent(self, k: str, data: bytes) -> None:
        if len(data) >= self.multipart_threshold_bytes:
            self._multipart_put_if_absent(k, data)
        else:
            self._call("put_object", Key=self._key(k), Body=data, IfNoneMatch="*")

    def _multipart_put_if_absent(self, k: str, data: bytes) -> None:
        s3key = self._key(k)
        mpu = self._call("create_multipart_upload", Key=s3key)
        upload_id = mpu["UploadId"]
        try:
            parts = []
            for n, off in enumerate(range(0, len(data), _PART_BYTES), start=1):
                r = self._call(
                    "upload_part",
                    Key=s3key,
                    UploadId=upload_id,
                    PartNumber=n,
                    Body=data[off : off + _PART_BYTES],
                )
                parts.append({"PartNumber": n, "ETag": r["ETag"]})
            self._call(
                "complete_multipart_upload",
                Key=s3key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except BaseException:
            try:
                self._call("abort_multipart_upload", Key=s3key, UploadId=upload_id)
            except StoreError:
                pass  # the upload id expires on its own; nothing became visible
            raise

    def put(self, k: str, data: bytes) -> None:
        self._call("put_object", Key=self._key(k), Body=data)

    def get(self, k: str) -> bytes:
        try:
            data: bytes = self.fs.cat_file(f"{self.bucket}/{self._key(k)}")
        except FileNotFoundError as exc:
            raise _not_found(exc, k) from exc
        except Exception as exc:
            raise _translate(exc, k) from exc
        return data

    def exists(self, k: str) -> bool:
        try:
            self._call("head_object", Key=self._key(k))
            return True
        except ObjectNotFound:
            return False

    def list(self, prefix: str) -> list[ObjectInfo]:
        full = self._key(prefix)
        out: list[ObjectInfo] = []
        token: str | None = None
        strip = len(self.prefix) + 1 if self.prefix else 0
        while True:
            kwargs: dict[str, Any] = {"Prefix": full}
            if token:
                kwargs["ContinuationToken"] = token
            r = self._call("list_objects_v2", **kwargs)
            for obj in r.get("Contents", []):
                k = obj["Key"][strip:]
                # A prefix "a/b" must not match "a/bc/...": keep exact key or children only.
                if prefix and not (k == prefix or k.startswith(prefix.rstrip("/") + "/")):
                    continue
                modified = obj.get("LastModified")
                out.append(ObjectInfo(k, int(obj["Size"]), None if modified is None else
                                      int(modified.timestamp() * 1_000_000)))
            if not r.get("IsTruncated"):
                break
            token = r.get("NextContinuationToken")
        out.sort(key=lambda o: o.key)
        return out

    def listing(self, prefix: str) -> Listing:
        return Listing(tuple(self.list(prefix)), None)  # S3 has no cheap change stamp

    def subdirs(self, prefix: str) -> tuple[_Names, Hashable | None]:
        full = self._key(prefix.rstrip("/")) + "/" if prefix else (
            f"{self.prefix}/" if self.prefix else "")
        names: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": full, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            r = self._call("list_objects_v2", **kwargs)
            names += [p["Prefix"][len(full):].rstrip("/") for p in r.get("CommonPrefixes", [])]
            if not r.get("IsTruncated"):
                break
            token = r.get("NextContinuationToken")
        return sorted(names), None

    def delete(self, k: str) -> None:
        self._call("delete_object", Key=self._key(k))

    def arrow_fs(self) -> tuple[pafs.FileSystem, str]:
        kwargs: dict[str, Any] = {}
        if self._endpoint:
            u = urlparse(self._endpoint)
            kwargs["endpoint_override"] = self._endpoint
            kwargs["scheme"] = u.scheme or "http"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        fs = pafs.S3FileSystem(
            connect_timeout=3,
            request_timeout=30,
            retry_strategy=pafs.AwsStandardS3RetryStrategy(2),
            **kwargs,
        )
        root = f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket
        return fs, root


def _not_found(exc: FileNotFoundError, k: str) -> StoreError:
    """s3fs reports a missing bucket as FileNotFoundError too; that is no missing object."""
    cause = exc.__cause__
    if isinstance(cause, Exception):
        err = _translate(cause, k)
        if err.code == "no_such_bucket":
            return err
    return ObjectNotFound(f"{k} not found")


def _translate(exc: Exception, k: str) -> StoreError:
    """Map botocore/aiohttp/OS errors to the store's own."""
    code = ""
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict):
        code = str(resp.get("Error", {}).get("Code", ""))
    status = None
    if isinstance(resp, dict):
        status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
        return ObjectExists(f"{k} already exists")
    if code in ("NoSuchBucket",):  # before the 404 test: a missing bucket is no missing object
        return StoreError(f"bucket does not exist: {exc}", code="no_such_bucket")
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return ObjectNotFound(f"{k} not found")
    if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StoreError(f"access denied for {k}: {code}", code="store_access_denied")
    return StoreUnavailable(f"store unavailable ({type(exc).__name__}: {exc})")


class Store:
    """A Timetravel store: Parquet and JSON objects under one root URL.

    Args:
        url: ``file:///abs/path``, a plain path, or ``s3://bucket/prefix``. ``None`` means
            ``./timetravel-data``.
    """

    def __init__(self, url: str | os.PathLike[str] | None = None) -> None:
        url = os.fspath(url) if url is not None else DEFAULT_STORE
        self.url = url
        parsed = urlparse(url)
        self.backend: Backend
        if parsed.scheme == "s3":
            if not parsed.netloc:
                raise InvalidKey(f"store URL {url!r} has no bucket", field="store")
            self.backend = S3Backend(parsed.netloc, parsed.path)
            self.is_local = False
        elif parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):  # file://data/x would silently mean /x
                raise InvalidKey(
                    f"store URL {url!r} names a host; use file:///absolute/path", field="store"
                )
            self.backend = LocalBackend(Path(parsed.path))
            self.is_local = True
        elif parsed.scheme == "" or len(parsed.scheme) == 1:  # plain path (or C:\ on Windows)
            self.backend = LocalBackend(Path(url))
            self.is_local = True
        else:
            raise InvalidKey(f"unsupported store URL scheme {parsed.scheme!r}", field="store")
        self._arrow_fs: tuple[pafs.FileSystem, str] | None = None

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # bytes -------------------------------------------------------------------------------
    def put_if_absent(self, k: str, data: bytes) -> None:
        """Create ``k`` with ``data`` unless it exists. Atomic.

        Raises:
            ObjectExists: the key was already there; nothing was written.
            StoreUnavailable: the backend could not be reached; the put may be retried.
        """
        self.backend.put_if_absent(k, data)

    def put(self, k: str, data: bytes) -> None:
        """Create or replace ``k``. Only for mutable pointers (heartbeats, job state)."""
        self.backend.put(k, data)

    def get(self, k: str) -> bytes:
        return self.backend.get(k)

    def exists(self, k: str) -> bool:
        return self.backend.exists(k)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under ``prefix`` (recursively), sorted by key. Missing prefix: ``[]``."""
        return self.backend.list(prefix)

    def listing(self, prefix: str = "") -> Listing:
        """As :meth:`list`, with a change token (see :class:`~ttstore._listing.Listing`): a
        local store re-reads only the directories whose stat changed, so a repeated listing of
        an unchanged prefix costs a few ``stat`` calls, and never misses an object created
        before the call."""
        return self.backend.listing(prefix)

    def subdirs(self, prefix: str = "") -> tuple[_Names, Hashable | None]:
        """The names of the "directories" directly under ``prefix`` (sorted), and a change
        token for that level (None on S3)."""
        return self.backend.subdirs(prefix)

    def unchanged(self, tokens: Sequence[Hashable]) -> bool:
        """Whether listings with these tokens (from :meth:`listing` and :meth:`subdirs`, all
        non-None) would show the same objects now. A few ``stat`` calls on a local store;
        always False on S3, which has no such stamp."""
        return self.is_local and all(unchanged(t) for t in tokens)

    def delete(self, k: str) -> None:
        self.backend.delete(k)

    # parquet -----------------------------------------------------------------------------
    def write_parquet(self, k: str, table: pa.Table, *, row_group_size: int | None = None) -> int:
        """Serialize ``table`` as zstd Parquet and create it at ``k`` (create-if-absent).

        The bytes depend only on the table, so a retried write produces the same object.

        Returns:
            The object size in bytes.
        """
        data = parquet_bytes(table, row_group_size=row_group_size)
        self.put_if_absent(k, data)
        return len(data)

    def read_parquet(self, k: str, *, columns: Sequence[str] | None = None) -> pa.Table:
        cols = None if columns is None else list(columns)
        return pq.read_table(io.BytesIO(self.get(k)), columns=cols)

    def arrow_filesystem(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the root path inside it, for dataset scans."""
        if self._arrow_fs is None:
            self._arrow_fs = self.backend.arrow_fs()
        return self._arrow_fs

    def iter_keys(self, prefix: str, suffix: str = "") -> Iterator[str]:
        for o in self.list(prefix):
            if o.key.endswith(suffix):
                yield o.key


def parquet_bytes(table: pa.Table, *, row_group_size: int | None = None) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression="zstd",
        row_group_size=row_group_size,
        write_statistics=True,
        store_schema=True,
    )
    return bytes(sink.getvalue().to_pybytes())
