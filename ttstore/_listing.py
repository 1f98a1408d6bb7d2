"""Listings that can tell whether anything changed: what lets the query server answer from cache
without ever hiding an object created before the request.

A :class:`Listing` carries a *token*. Two listings of one prefix with equal, non-None tokens
show the same objects, so whatever a caller derived from the first (parsed partitions, commit
records, an index of files) is still right for the second. A None token promises nothing.

Local directories (:class:`DirectoryCache`): a directory's entries change only through entry
creation, removal and renames inside it, and each of those updates the directory's
``st_mtime``/``st_ctime``. So a directory is re-read only when its stat differs from the one
recorded before it was last read. File timestamps are coarse (a kernel tick, or worse on some
filesystems): a change in the same tick as the recorded stat could leave it unchanged. As in
git's "racily clean" index entries, a directory read less than :data:`RACY_MARGIN_NS` after its
last change is not trusted: it is read again every time until it has been quiet for that long,
and listings under it have no token. Objects in a store are immutable once created (mutable
pointers are replaced by rename), so entry sizes need no stat of their own.

This needs a filesystem whose directory timestamps are kept by the machine that reads them
(local disks, tmpfs, overlay). Network filesystems that cache attributes are not supported for
the query server's store (every component still works, without the cache).

S3 has no such stamp: its listings always have a None token (callers list every time).
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field

#: A directory changed this recently (by its mtime/ctime) is read again on every listing.
RACY_MARGIN_NS = 1_000_000_000
#: Directories whose entries are kept (least recently used evicted).
DEFAULT_MAX_DIRS = 50_000


@dataclass(frozen=True)
class ObjectInfo:
    """An object in a listing.

    Attributes:
        key: its key.
        size: its size in bytes.
        modified_us: when it was written (the store's clock, microseconds since the epoch), as
            ``Store.list`` gives it; None from cached listings (``Store.listing``). Not part of
            equality: two listings of the same objects compare equal.
    """

    key: str
    size: int
    modified_us: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Listing:
    """The objects under a prefix (recursively, sorted by key), and a change token.

    Attributes:
        objects: what the listing showed.
        token: equal for two listings of the same prefix only if nothing under it changed in
            between; None when the store cannot tell (S3, or a directory that changed within
            the last second).
    """

    objects: tuple[ObjectInfo, ...]
    token: Hashable | None


_Stamp = tuple[int, int, int, int]  # (st_dev, st_ino, st_mtime_ns, st_ctime_ns)
_Stamps = tuple[tuple[str, "_Stamp | None"], ...]


@dataclass(frozen=True)
class _Dir:
    stamp: _Stamp
    files: tuple[tuple[str, int], ...]  # (name, size), sorted by name
    dirs: tuple[str, ...]  # sorted
    trusted: bool  # read at least RACY_MARGIN_NS after its last change


class DirectoryCache:
    """Entries of local directories, re-read when their stat changes. Thread-safe.

    Args:
        max_dirs: directories kept; the least recently used are forgotten beyond it.
    """

    def __init__(self, *, max_dirs: int = DEFAULT_MAX_DIRS) -> None:
        self.max_dirs = max_dirs
        self._dirs: OrderedDict[str, _Dir] = OrderedDict()
        # base -> a trusted listing and the (directory, stamp) pairs it was made of
        self._listings: OrderedDict[str, tuple[Listing, _Stamps]] = OrderedDict()
        self._lock = threading.Lock()
        self.reads = 0  # directories actually read (for tests and metrics)

    def _entry(self, path: str) -> _Dir | None:
        """The entries of ``path`` as of now; None if it is not a directory (any more)."""
        stamp = _stamp(path)
        if stamp is None:
            return None
        with self._lock:
            hit = self._dirs.get(path)
            if hit is not None and hit.trusted and hit.stamp == stamp:
                self._dirs.move_to_end(path)
                return hit
        read_at_ns = time.time_ns()
        entry = _read_dir(path, stamp, trusted=read_at_ns - max(stamp[2], stamp[3])
                          > RACY_MARGIN_NS)
        if entry is None:
            return None
        with self._lock:
            self.reads += 1
            self._dirs[path] = entry
            self._dirs.move_to_end(path)
            while len(self._dirs) > self.max_dirs:
                self._dirs.popitem(last=False)
        return entry

    def listing(self, root: str, prefix: str) -> Listing:
        """Every object under ``root/prefix`` (recursively), keys relative to ``root``."""
        base = (os.path.join(root, prefix) if prefix else root).rstrip(os.sep) or os.sep
        with self._lock:
            last = self._listings.get(base)
        if last is not None and unchanged(last[1]):
            return last[0]  # every directory of the tree is as it was when it was trusted
        out, stamps = self._walk(root, prefix, base)
        if out.token is not None:
            with self._lock:
                self._listings[base] = (out, stamps)
                self._listings.move_to_end(base)
                while len(self._listings) > self.max_dirs:
                    self._listings.popitem(last=False)
        return out

    def _walk(self, root: str, prefix: str, base: str) -> tuple[Listing, _Stamps]:
        skip = len(root) + 1
        out: list[ObjectInfo] = []
        stamps: list[tuple[str, _Stamp | None]] = []
        trusted = True
        stack = [base]
        while stack:
            d = stack.pop()
            entry = self._entry(d)
            if entry is None:
                if d == base and os.path.isfile(base):  # the prefix names one object
                    return Listing((ObjectInfo(prefix, os.stat(base).st_size),), None), ()
                stamps.append((d, None))
                continue
            stamps.append((d, entry.stamp))
            trusted = trusted and entry.trusted
            rel = d[skip:].replace(os.sep, "/")
            for name, size in entry.files:
                out.append(ObjectInfo(f"{rel}/{name}" if rel else name, size))
            stack.extend(os.path.join(d, n) for n in entry.dirs)
        out.sort(key=lambda o: o.key)
        done = tuple(stamps)
        return Listing(tuple(out), done if trusted else None), done

    def children(self, root: str, prefix: str) -> tuple[list[str], Hashable | None]:
        """The names of the directories directly under ``root/prefix``, and a change token
        for that one directory (None when racy or missing)."""
        base = (os.path.join(root, prefix) if prefix else root).rstrip(os.sep) or os.sep
        entry = self._entry(base)
        if entry is None:
            return [], None
        return list(entry.dirs), ((base, entry.stamp),) if entry.trusted else None


def unchanged(token: Hashable) -> bool:
    """Whether every directory behind a local listing's (or several listings' concatenated)
    token still has the stamp it had: then those listings would show the same objects now."""
    pairs: _Stamps = token  # type: ignore[assignment]
    return all(_stamp(d) == st for d, st in pairs)


def _stamp(path: str) -> _Stamp | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)


def _read_dir(path: str, stamp: _Stamp, *, trusted: bool) -> _Dir | None:
    files: list[tuple[str, int]] = []
    dirs: list[str] = []
    try:
        it = os.scandir(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                dirs.append(e.name)
                continue
            if e.name.startswith("_tmp.") or e.is_dir():  # a temp file, a link to a directory
                continue
            try:
                size = e.stat().st_size
            except FileNotFoundError:
                continue  # deleted while we read
            files.append((e.name, size))
    files.sort()
    dirs.sort()
    return _Dir(stamp, tuple(files), tuple(dirs), trusted)
