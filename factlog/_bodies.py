"""Request bodies of ``POST /v1/facts/{fact_type}``: a JSON array, NDJSON, or an Arrow IPC
stream, turned into the stored table plus per-row rejections.

A body that does not parse at all raises :class:`ttstore.InvalidBody` (400). Otherwise every row
is either accepted or rejected with a reason, and the valid rows are kept:

- JSON array: each element is one fact; an element that is not an object is rejected.
- NDJSON: one fact per non-blank line; ``index`` counts non-blank lines from 0. A line that is
  not valid JSON is rejected (code ``invalid_json``) and the other lines are kept; a body in
  which no line parses is a 400.
- Arrow IPC stream: validated column-wise by :func:`factlog.table_to_facts`. Problems of a
  whole column (an unknown column, a wrong column type) are a 400 naming the column, since no
  row of that column can be right.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ttstore import ARROW_STREAM, InvalidBody, UnsupportedMediaType

from ._facttypes import FactType
from ._validate import Rejection, rows_to_table, table_to_facts

JSON = "application/json"
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines")
#: The Content-Types ``POST /v1/facts/{fact_type}`` takes.
FACT_BODY_TYPES = (JSON, NDJSON_TYPES[0], ARROW_STREAM)


@dataclass(frozen=True)
class ParsedFacts:
    """The stored table of the accepted rows, and the rejected rows."""

    table: pa.Table
    rejected: list[Rejection]
    rows: int  # how many facts the body held


def body_kind(content_type: str | None) -> str:
    """``"json"``, ``"ndjson"`` or ``"arrow"`` for a Content-Type header (JSON when absent).

    Raises:
        UnsupportedMediaType: any other type.
    """
    mime = (content_type or "").split(";", 1)[0].strip().lower()
    if mime in ("", JSON) or mime.endswith("+json"):
        return "json"
    if mime in NDJSON_TYPES:
        return "ndjson"
    if mime == ARROW_STREAM:
        return "arrow"
    raise UnsupportedMediaType(
        f"Content-Type {mime!r} is not supported; send {', '.join(FACT_BODY_TYPES)}"
    )


def parse_facts(
    ft: FactType,
    body: bytes,
    *,
    kind: str,
    now_us: int,
    producer: str,
    skew_us: int,
) -> ParsedFacts:
    """Parse and validate a request body of facts of type ``ft``.

    ``logged_at`` is ``now_us`` unless a row supplies it (posting needs the write scope, which
    allows imports); ``ingested_at`` is ``now_us``; ``producer`` is the token's name.

    Raises:
        InvalidBody: the body does not parse at all.
        FactValidationError: an Arrow column that cannot be right for any row.
    """
    if kind == "arrow":
        table = _read_arrow(body)
        try:
            out, rejected = table_to_facts(
                ft, table, logged_at_us=now_us, now_us=now_us, ingested_at_us=now_us,
                producer=producer, allow_logged_at=True, skew_us=skew_us)
        except pa.ArrowException as exc:  # e.g. a lossy cast of a timestamp column
            raise InvalidBody(f"fact type {ft.name!r}: cannot read the Arrow table: {exc}") \
                from exc
        return ParsedFacts(out, rejected, table.num_rows)
    if kind == "ndjson":
        rows, bad = _read_ndjson(body)
    else:
        rows, bad = _read_json_array(body), {}
    good_idx = [i for i in range(len(rows)) if i not in bad]
    out, rejected = rows_to_table(
        ft, [rows[i] for i in good_idx], logged_at_us=now_us, now_us=now_us,
        ingested_at_us=now_us, producer=producer, allow_logged_at=True, skew_us=skew_us)
    if bad:
        rejected = sorted(
            [Rejection(good_idx[r.index], r.field, r.code, r.message) for r in rejected]
            + [Rejection(i, None, "invalid_json", f"fact type {ft.name!r}: {msg}")
               for i, msg in bad.items()],
            key=lambda r: r.index)
    return ParsedFacts(out, rejected, len(rows))


def _read_arrow(body: bytes) -> pa.Table:
    if not body:
        raise InvalidBody("the body is empty; expected an Arrow IPC stream")
    try:
        with pa.ipc.open_stream(pa.BufferReader(body)) as reader:
            return reader.read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise InvalidBody(f"the body is not an Arrow IPC stream: {exc}") from None


def _read_json_array(body: bytes) -> list[Any]:
    try:
        rows = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidBody(f"the body is not valid JSON: {exc}") from None
    if not isinstance(rows, list):
        raise InvalidBody(
            f"expected a JSON array of facts, got a JSON {type(rows).__name__}; send one fact "
            "per line as application/x-ndjson to stream objects"
        )
    return rows


def _read_ndjson(body: bytes) -> tuple[list[Any], dict[int, str]]:
    rows: list[Any] = []
    bad: dict[int, str] = {}
    for lineno, line in enumerate(body.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except (UnicodeDecodeError, ValueError) as exc:
            bad[len(rows)] = f"line {lineno} is not valid JSON: {exc}"
            rows.append(None)
    if bad and len(bad) == len(rows):
        first = next(iter(bad.values()))
        raise InvalidBody(f"no line of the NDJSON body parses ({first})")
    return rows, bad
