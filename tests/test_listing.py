"""Listings with change tokens (``Store.listing``/``Store.subdirs``): on every backend they show
what ``Store.list`` shows; on a local store an unchanged tree is served from memory (a few
``stat`` calls) and any change since, even within the same clock tick, is seen at once."""

from __future__ import annotations

import os
import time

import pytest

import ttstore._listing as listing_mod
from factlog import FactReader, FactTypeCatalog
from tests.factdata import DAY, PLAY, T0, H, write_facts
from ttstore import Store


@pytest.fixture
def short_margin(monkeypatch: pytest.MonkeyPatch) -> float:
    """A directory counts as settled 50 ms after its last change (instead of 1 s)."""
    monkeypatch.setattr(listing_mod, "RACY_MARGIN_NS", 50_000_000)
    return 0.06


def reads(store: Store) -> int:
    return store.backend._dirs.reads  # type: ignore[attr-defined]


def test_listing_shows_what_list_shows(store: Store) -> None:
    for k in ("p/a/1.json", "p/a/deep/2.json", "p/b.json", "q/3.json", "pa/4.json"):
        store.put_if_absent(k, b"x" * len(k))
    for prefix in ("p", "p/", "p/a", "p/b.json", "nope/", ""):
        assert list(store.listing(prefix).objects) == store.list(prefix), prefix
    names, _ = store.subdirs("p")
    assert names == ["a"]
    assert store.subdirs("")[0] == ["p", "pa", "q"]
    assert store.subdirs("nope")[0] == []
    if not store.is_local:
        assert store.listing("p").token is None  # S3: no stamp, list every time


def test_unchanged_tree_is_not_read_again(local_store: Store, short_margin: float) -> None:
    local_store.put_if_absent("p/a/1.json", b"1")
    local_store.put_if_absent("p/b/2.json", b"22")
    time.sleep(short_margin)
    first = local_store.listing("p")
    assert first.token is not None
    before = reads(local_store)
    for _ in range(5):
        again = local_store.listing("p")
        assert again.token == first.token and again.objects == first.objects
    assert reads(local_store) == before


@pytest.mark.parametrize("change", ["create", "delete", "replace", "new_subdir", "rmdir"])
def test_every_change_is_seen_at_once(
    local_store: Store, short_margin: float, change: str
) -> None:
    local_store.put_if_absent("p/a/1.json", b"1")
    local_store.put_if_absent("p/b/2.json", b"22")
    local_store.put("p/a/ptr.json", b"v1")
    time.sleep(short_margin)
    first = local_store.listing("p")
    assert first.token is not None
    if change == "create":
        local_store.put_if_absent("p/b/3.json", b"333")
    elif change == "delete":
        local_store.delete("p/a/1.json")
    elif change == "replace":  # a mutable pointer, rewritten by rename
        local_store.put("p/a/ptr.json", b"version-2")
    elif change == "new_subdir":
        local_store.put_if_absent("p/b/c/4.json", b"4")
    else:
        local_store.delete("p/b/2.json")
        os.rmdir(local_store.backend.root / "p" / "b")  # type: ignore[attr-defined]
    now = local_store.listing("p")
    assert list(now.objects) == local_store.list("p")
    assert now.objects != first.objects
    assert now.token != first.token


def test_a_change_in_the_same_clock_tick_is_seen(local_store: Store, short_margin: float) -> None:
    """A filesystem whose timestamps are coarser than the time between two changes leaves the
    directory's mtime as it was: the ctime part of the stamp still moves."""
    d = local_store.backend.root / "p"  # type: ignore[attr-defined]
    local_store.put_if_absent("p/1.json", b"1")
    time.sleep(short_margin)
    first = local_store.listing("p")
    st = os.stat(d)
    local_store.put_if_absent("p/2.json", b"2")
    os.utime(d, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime back to the recorded one
    assert os.stat(d).st_mtime_ns == st.st_mtime_ns
    assert [o.key for o in local_store.listing("p").objects] == ["p/1.json", "p/2.json"]
    assert first.token is not None


def test_a_recently_changed_directory_is_read_every_time(
    local_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listing_mod, "RACY_MARGIN_NS", 3_600 * 10**9)  # never settles
    local_store.put_if_absent("p/1.json", b"1")
    before = reads(local_store)
    for _ in range(3):
        assert local_store.listing("p").token is None
    assert reads(local_store) == before + 3


def test_reader_sees_an_object_written_right_after_a_cached_listing(
    local_store: Store, short_margin: float
) -> None:
    """The query side's guarantee: a fact visible to a fresh reader is visible to a long-lived
    one, however warm its caches."""
    FactTypeCatalog(local_store).declare(PLAY)
    write_facts(local_store, PLAY, [
        {"member_id": 1, "fact_id": "a", "event_time": T0 + H, "logged_at": T0 + H,
         "video_id": 1},
        {"member_id": 1, "fact_id": "b", "event_time": T0 + DAY, "logged_at": T0 + DAY,
         "video_id": 2}])
    time.sleep(short_margin)
    reader = FactReader(local_store)
    for _ in range(2):  # warm: partitions built once, then reused
        assert reader.scan("play").column("fact_id").to_pylist() == ["a", "b"]
    assert reader.scan("play", end_us=T0 + DAY).num_rows == 2
    write_facts(local_store, PLAY, [
        {"member_id": 1, "fact_id": "c", "event_time": T0 + 2 * H, "logged_at": T0 + 2 * H,
         "video_id": 3},
        {"member_id": 1, "fact_id": "d", "event_time": T0 + 5 * DAY, "logged_at": T0 + 5 * DAY,
         "video_id": 4}], writer="w9")
    fresh = FactReader(local_store).scan("play").column("fact_id").to_pylist()
    assert fresh == ["a", "c", "b", "d"]
    assert reader.scan("play").column("fact_id").to_pylist() == fresh
    assert reader.scan("play", start_us=T0, end_us=T0 + DAY).column(
        "fact_id").to_pylist() == ["a", "c", "b"]
