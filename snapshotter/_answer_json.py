"""Reading services' JSON answers: one entity's object, or a batch answer's ``results``.

orjson parses where its re-encoding gives back exactly the service's bytes (compact JSON, as
the simulated world and most services send), so ``raw_json`` is always the service's own text
and an integer beyond 64 bits (which orjson reads as a float) stays an int: anything else takes
the stdlib, as slices of the answer's text.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")
_scanstring: Any = json.decoder.scanstring  # type: ignore[attr-defined]


def _skip(text: str, i: int) -> int:
    """The position after any JSON whitespace at ``i``."""
    m = _WS.match(text, i)
    return i if m is None else m.end()


def parse_answer(body: bytes) -> tuple[Any, str | None]:
    """A per-entity answer's JSON value and its text (stripped), or ``(None, None)``.

    orjson's parse is taken only when re-encoding it gives back exactly the service's bytes
    (compact JSON, as the simulated world and most services send): it reads an integer beyond
    64 bits as a float, and the stdlib keeps it an int, so anything else takes the stdlib parse.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    else:
        try:
            if orjson.dumps(value) == body:
                return value, body.decode("utf-8")
        except TypeError:  # a value orjson reads but does not write: take the stdlib parse
            pass
    try:
        text = body.decode("utf-8")
        return json.loads(text), text.strip()
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, None


def batch_results(body: bytes | None) -> dict[str, tuple[Any, str]] | None:
    """The ``results`` of a batch answer as ``{id: (value, its JSON text)}``, or None when the
    answer is not ``{"results": {...}}``.

    Each value's text is what the service sent for it, so ``raw_json`` is the service's own
    text. The fast path parses with orjson and takes each value's compact re-encoding as its
    text when the re-encoded answer is exactly the service's bytes (see :func:`parse_answer`);
    otherwise a scan keeps each value's slice of the answer, and an answer of another shape
    (more keys, odd order) falls back to a full parse.
    """
    if body is None:
        return None
    fast = _canonical_results(body)
    if fast is not None:
        return fast
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        fast = _scan_results(text)
    except (json.JSONDecodeError, ValueError, IndexError):
        fast = None
    if fast is not None:
        return fast
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return None
    results = doc.get("results") if isinstance(doc, dict) else None
    if not isinstance(results, dict):
        return None
    return {k: (v, json.dumps(v, separators=(",", ":"))) for k, v in results.items()}


_RESULTS_OPEN = b'{"results":{'
_RESULTS_CLOSE = b"}}"


def _canonical_results(body: bytes) -> dict[str, tuple[Any, str]] | None:
    """:func:`batch_results` when the answer is exactly orjson's compact encoding of
    ``{"results": {...}}``; None otherwise (the caller then scans the text)."""
    if not body.startswith(_RESULTS_OPEN):
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    results = doc.get("results") if type(doc) is dict and len(doc) == 1 else None
    if type(results) is not dict:
        return None
    dumps = orjson.dumps
    try:
        texts = list(map(dumps, results.values()))
        keys = list(map(dumps, results))
    except TypeError:
        return None
    items = b",".join([k + b":" + t for k, t in zip(keys, texts, strict=True)])
    if len(body) != len(_RESULTS_OPEN) + len(items) + len(_RESULTS_CLOSE) or (
        body != _RESULTS_OPEN + items + _RESULTS_CLOSE
    ):
        return None
    return {k: (v, t.decode()) for (k, v), t in zip(results.items(), texts, strict=True)}


def _scan_results(text: str) -> dict[str, tuple[Any, str]] | None:
    """Scan exactly ``{"results": {"<id>": <value>, ...}}``, keeping each value's text."""
    def expect(i: int, token: str) -> int:
        i = _skip(text, i)
        if not text.startswith(token, i):
            raise ValueError(token)
        return _skip(text, i + len(token))

    i = expect(0, "{")
    i = expect(i, '"results"')
    i = expect(i, ":")
    i = expect(i, "{")
    out: dict[str, tuple[Any, str]] = {}
    if text.startswith("}", i):
        i += 1
    else:
        while True:
            if not text.startswith('"', i):
                return None
            key, i = _scanstring(text, i + 1)
            i = expect(i, ":")
            value, end = _DECODER.raw_decode(text, i)
            out[key] = (value, text[i:end])
            i = _skip(text, end)
            if text.startswith(",", i):
                i = _skip(text, i + 1)
                continue
            if text.startswith("}", i):
                i += 1
                break
            return None
    i = expect(i, "}")
    return out if i == len(text) else None
