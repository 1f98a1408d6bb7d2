"""Fact ids: UUIDv7, generated vectorized in the writer, never per fact on the caller's thread."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
# Positions of the 32 hex digits inside the 36-character canonical form.
_DIGIT_POS = np.array([i for i in range(36) if i not in (8, 13, 18, 23)])


def uuid7_array(logged_at_us: np.ndarray) -> pa.StringArray:
    """One canonical lowercase UUIDv7 per element, ordered by ``logged_at_us``.

    The 48-bit millisecond timestamp is followed by 12 bits of sub-millisecond fraction
    (RFC 9562, method 3), so ids from one writer sort by acceptance time to the microsecond; the
    remaining 62 bits are random.
    """
    us = np.asarray(logged_at_us, dtype=np.int64)
    n = len(us)
    ms = (us // 1000).astype(np.uint64)
    sub = ((us % 1000) * 4096 // 1000).astype(np.uint64)  # 0..4095
    rand = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) if n else np.zeros(0, np.uint64)
    hi = (ms << np.uint64(16)) | np.uint64(0x7000) | sub
    lo = (rand & np.uint64(0x3FFFFFFFFFFFFFFF)) | np.uint64(0x8000000000000000)
    raw = np.empty((n, 16), dtype=np.uint8)
    raw[:, :8] = hi.astype(">u8").view(np.uint8).reshape(n, 8)
    raw[:, 8:] = lo.astype(">u8").view(np.uint8).reshape(n, 8)
    nibbles = np.empty((n, 32), dtype=np.uint8)
    nibbles[:, 0::2] = raw >> 4
    nibbles[:, 1::2] = raw & 0x0F
    text = np.full((n, 36), ord("-"), dtype=np.uint8)
    text[:, _DIGIT_POS] = _HEX[nibbles]
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    return pa.StringArray.from_buffers(
        n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(text.tobytes())
    )
