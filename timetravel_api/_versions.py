"""Encoder versions (SPEC §5): a hash of the encoder's code and of the repo module that defines
it, the same in every process (no ids, no set order)."""

from __future__ import annotations

import hashlib
import inspect
import json
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["code_version", "module_source"]


def code_version(
    declaration: dict[str, Any], functions: Iterable[Callable[..., Any] | None], module: bytes,
) -> str:
    """16 hex digits of SHA-256 over the declaration (as canonical JSON), each function's code
    (its source, else its bytecode and constants) and the defining module's source."""
    h = hashlib.sha256()
    h.update(json.dumps(declaration, sort_keys=True).encode())
    for fn in functions:
        h.update(b"\x00fn\x00")
        if fn is not None:
            h.update(_code_digest(fn))
    h.update(b"\x00module\x00")
    h.update(module)
    return h.hexdigest()[:16]


def module_source(fn: Callable[..., Any]) -> bytes:
    """The source file of the module that defines ``fn`` (empty when there is none)."""
    path = getattr(fn, "__globals__", {}).get("__file__")
    if not path:
        return b""
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def _code_digest(fn: Callable[..., Any]) -> bytes:
    try:
        return inspect.getsource(fn).encode()
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        return b"" if code is None else _code_bytes(code)


def _code_bytes(code: types.CodeType) -> bytes:
    parts = [code.co_code, repr(code.co_names).encode(), repr(code.co_varnames).encode()]
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            parts.append(_code_bytes(c))
        elif isinstance(c, frozenset):
            parts.append(repr(sorted(map(repr, c))).encode())  # set order varies per process
        else:
            parts.append(repr(c).encode())
    return b"\x00".join(parts)
