"""Context sets in the store: save (atomically), load, the latest as of a time, and the list.

Layout::

    snapshots/selections/<selection_id>/contexts.parquet   the selected rows (immutable)
    snapshots/selections/<selection_id>/report.png         population vs sample shares
    snapshots/selections/<selection_id>/selection.json     the design: the commit point

A context set exists once its ``selection.json`` does. The Parquet (and the report) are written
first; ``selection.json`` is created last with a conditional put, so a reader that finds it also
finds the rows, and a crash before it leaves nothing that any reader here lists. Saving the same
context set again (same id, same design) is a no-op; a different one under the same id is refused.

``selection_id`` is ``sel-<selected_at>-<digest>`` (``sel-20261120T100000Z-3f9a1c2b7d4e``), so
the selection time is read from the key without opening anything.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

from ttstore import (
    Clock,
    InvalidInput,
    ObjectExists,
    ObjectNotFound,
    Store,
    SystemClock,
    format_timestamp,
    key,
    parse_timestamp,
)

from ._design import ContextSet, SelectionDesign
from ._errors import SelectionConflict, SelectionNotFound, SnapshotterError

SELECTIONS_PREFIX = "snapshots/selections"
CONTEXTS_NAME = "contexts.parquet"
DESIGN_NAME = "selection.json"
REPORT_NAME = "report.png"
log = logging.getLogger("snapshotter.selections")
_SELECTION_ID = re.compile(r"sel-(\d{8}T\d{6}(?:\.\d{6})?Z)-[0-9a-f]{12}")


def parse_selection_id(selection_id: str) -> int:
    """The ``selected_at`` (µs) encoded in a selection id.

    Raises:
        InvalidInput: (code ``invalid_selection_id``) for anything that is not a selection id.
    """
    m = _SELECTION_ID.fullmatch(selection_id)
    if m is None:
        raise InvalidInput(
            f"{selection_id!r} is not a selection id (sel-YYYYMMDDTHHMMSSZ-<12 hex>)",
            field="selection_id", code="invalid_selection_id",
        )
    body = m.group(1).removesuffix("Z")
    fmt = "%Y%m%dT%H%M%S.%f" if "." in body else "%Y%m%dT%H%M%S"
    return parse_timestamp(datetime.strptime(body, fmt).replace(tzinfo=UTC), field="selection_id")


def selection_key(selection_id: str, name: str) -> str:
    """The store key of one object of a context set (``contexts.parquet``, ...)."""
    parse_selection_id(selection_id)
    return key(SELECTIONS_PREFIX, selection_id, name)


def save_selection(
    store: Store, cs: ContextSet, *, report: bool = True, clock: Clock | None = None
) -> str:
    """Commit a context set to the store: rows and report first, ``selection.json`` last.

    Args:
        store: the store.
        cs: the context set (from ``select_contexts``).
        report: also render and store ``report.png`` (population vs sample shares).
        clock: the clock for ``committed_at`` in the design (system clock by default).

    Returns:
        The selection id.

    Raises:
        SelectionConflict: a different context set already holds this id.
        StoreError: the store failed; nothing is visible unless ``selection.json`` was created.
    """
    sid = cs.selection_id
    data_key = selection_key(sid, CONTEXTS_NAME)
    design_key = selection_key(sid, DESIGN_NAME)
    try:
        store.write_parquet(data_key, cs.table)
    except ObjectExists:
        # A retry after a crash, or a save of the same set: the id fixes the content.
        if not store.read_parquet(data_key).equals(cs.table):
            raise _conflict(sid) from None
    if report:
        from ._report import render_report  # noqa: PLC0415  (matplotlib loads only when needed)

        try:
            store.put_if_absent(selection_key(sid, REPORT_NAME), render_report(cs))
        except ObjectExists:
            pass  # written by an earlier attempt at this same set
    body = cs.design.to_json()
    body.pop("committed_at", None)
    committed_at = (clock or SystemClock()).now_us()
    try:
        store.put_if_absent(
            design_key,
            json.dumps({**body, "committed_at": format_timestamp(committed_at)},
                       indent=2).encode(),
        )
    except ObjectExists:
        existing = _read_design_json(store, sid)
        mine = json.loads(json.dumps(body))
        for volatile in ("committed_at", "source"):  # neither is part of the set's identity
            existing.pop(volatile, None)
            mine.pop(volatile, None)
        if existing != mine:
            raise _conflict(sid) from None
        log.info("selection %s was already committed; nothing to do", sid)
    return sid


def load_selection(store: Store, selection_id: str) -> ContextSet:
    """Read a committed context set.

    Raises:
        SelectionNotFound: no committed context set has this id.
        InvalidInput: ``selection_id`` is malformed.
    """
    design = SelectionDesign.from_json(_read_design_json(store, selection_id))
    table = store.read_parquet(selection_key(selection_id, CONTEXTS_NAME))
    return ContextSet(table=table, design=design)


def load_design(store: Store, selection_id: str) -> SelectionDesign:
    """Read only the design (``selection.json``) of a committed context set.

    Raises:
        SelectionNotFound: no committed context set has this id.
    """
    return SelectionDesign.from_json(_read_design_json(store, selection_id))


def latest_selection(store: Store, now_us: int) -> ContextSet:
    """The committed context set with the greatest ``selected_at`` not after ``now_us``.

    Ties on ``selected_at`` go to the one committed last (then the greatest id).

    Raises:
        SelectionNotFound: nothing was selected at or before ``now_us``.
    """
    candidates = [(t, sid) for sid, t in _committed_ids(store) if t <= now_us]
    if not candidates:
        raise SelectionNotFound(
            f"no context set was selected at or before {format_timestamp(now_us)}; "
            "run `timetravel snapshot select` first"
        )
    latest_t = max(t for t, _ in candidates)
    tied = sorted(sid for t, sid in candidates if t == latest_t)
    if len(tied) > 1:
        def committed(sid: str) -> tuple[str, str]:
            return (str(_read_design_json(store, sid).get("committed_at", "")), sid)

        tied.sort(key=committed)
    return load_selection(store, tied[-1])


def list_selections(store: Store) -> list[SelectionDesign]:
    """Every committed context set's design, oldest ``selected_at`` first."""
    ids = sorted(_committed_ids(store), key=lambda p: (p[1], p[0]))
    return [load_design(store, sid) for sid, _ in ids]


def _committed_ids(store: Store) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for k in store.iter_keys(SELECTIONS_PREFIX + "/", "/" + DESIGN_NAME):
        parts = k[len(SELECTIONS_PREFIX) + 1:].split("/")
        if len(parts) == 2 and _SELECTION_ID.fullmatch(parts[0]):
            out.append((parts[0], parse_selection_id(parts[0])))
    return out


def _read_design_json(store: Store, selection_id: str) -> dict[str, object]:
    try:
        raw = store.get(selection_key(selection_id, DESIGN_NAME))
    except ObjectNotFound:
        raise SelectionNotFound(f"no context set {selection_id!r} in the store") from None
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise SnapshotterError(
            f"selection {selection_id}: selection.json is not JSON", code="corrupt_selection"
        ) from exc
    if not isinstance(body, dict):
        raise SnapshotterError(
            f"selection {selection_id}: selection.json is not an object", code="corrupt_selection"
        )
    return body


def _conflict(selection_id: str) -> SelectionConflict:
    return SelectionConflict(f"selection {selection_id} already exists with different contents")
