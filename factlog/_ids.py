"""Fact ids: UUIDv7, generated vectorized in the writer, never per fact on the caller's thread."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

# Two ASCII hex digits for each byte value, as one uint16 (native byte order matches the view).
_HEX2 = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), dtype=np.uint16)


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
    words = np.empty((n, 2), dtype=">u8")  # big-endian: bytes in UUID order
    words[:, 0] = (ms << np.uint64(16)) | np.uint64(0x7000) | sub
    words[:, 1] = (rand & np.uint64(0x3FFFFFFFFFFFFFFF)) | np.uint64(0x8000000000000000)
    digits = _HEX2[words.view(np.uint8).reshape(n, 16)].view(np.uint8).reshape(n, 32)
    text = np.empty((n, 36), dtype=np.uint8)  # 8-4-4-4-12 digits with dashes between
    text[:, 0:8] = digits[:, 0:8]
    text[:, 9:13] = digits[:, 8:12]
    text[:, 14:18] = digits[:, 12:16]
    text[:, 19:23] = digits[:, 16:20]
    text[:, 24:36] = digits[:, 20:32]
    text[:, (8, 13, 18, 23)] = ord("-")
    offsets = np.arange(0, 36 * (n + 1), 36, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text))
