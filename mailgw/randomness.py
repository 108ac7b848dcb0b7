"""Random identifiers (message ids, Message-ID, MIME boundaries) from the kernel's
random bytes, fetched 4 KiB at a time.

`uuid4()` asks the kernel for 16 bytes each time. Under load every system call is a
point where the kernel may give the CPU to another process (PostgreSQL, the SMTP
clients), and delivering one message took four of them. The bytes are the same
`os.urandom` bytes, only read in bulk; the reactor thread is the only caller.
"""

from __future__ import annotations

import os
import uuid

_CHUNK = 4096


class _RandomBytes:
    def __init__(self) -> None:
        self._buffer = b""
        self._offset = 0

    def take(self, nbytes: int) -> bytes:
        if self._offset + nbytes > len(self._buffer):
            self._buffer, self._offset = os.urandom(max(_CHUNK, nbytes)), 0
        start, self._offset = self._offset, self._offset + nbytes
        return self._buffer[start:self._offset]

    def forget(self) -> None:
        """A forked child must not reuse its parent's bytes."""
        self._buffer, self._offset = b"", 0


_bytes = _RandomBytes()
os.register_at_fork(after_in_child=_bytes.forget)


def random_hex(nbytes: int = 16) -> str:
    """`nbytes` random bytes as lowercase hex (32 characters for the default, as
    `uuid4().hex`)."""
    return _bytes.take(nbytes).hex()


def random_uuid() -> str:
    """A random (version 4) UUID as text, like `str(uuid4())`."""
    return str(uuid.UUID(bytes=_bytes.take(16), version=4))
