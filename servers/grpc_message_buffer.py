"""A call's request stream cut into gRPC messages (a 5-byte prefix: compressed flag, big-endian length).

Most messages arrive whole in one DATA frame and never come here (`servers.grpc_h2` takes those
as they are). `MessageBuffer` is for the rest: messages that span frames, frames that hold several.
A message of `PREALLOCATE_MIN` bytes or more gets a buffer of its final size once its prefix is in,
and each piece is copied into place once. Grown piece by piece instead (a bytearray), a 4 MiB
request was moved in memory again at each reallocation: a quarter of the front-end's time was
memcpy under that growth.
"""

from __future__ import annotations

import numpy as np

#: messages at least this large are assembled in a buffer of their final size
PREALLOCATE_MIN = 64 << 10


class MessageTooLarge(Exception):
    """A message's prefix announced more than the limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"Received message larger than max ({size} vs. {limit})")
        self.size = size


class MessageBuffer:
    """The part of a message received so far; `feed` returns the messages that complete.

    True while a message is started and not complete (the request must not end there).
    """

    __slots__ = ("_big", "_filled", "_head", "limit")

    def __init__(self, limit: int) -> None:
        #: the largest message accepted (bytes after the prefix)
        self.limit = limit
        #: a small message's bytes so far (or a prefix not yet whole)
        self._head = bytearray()
        #: a large message's buffer, prefix included, filled up to `_filled`
        self._big: memoryview | None = None
        self._filled = 0

    def __bool__(self) -> bool:
        return bool(self._head) or self._big is not None

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, memoryview]]:
        """The messages that ``data`` (the next bytes of the stream) completes, in order, as
        (compressed flag, payload). Payloads are views: of ``data`` when a message lies whole in
        it, else of a buffer this object no longer touches.

        Raises:
            MessageTooLarge: a prefix announced more than `limit` bytes (the stream is unusable).
        """
        out: list[tuple[int, memoryview]] = []
        view = memoryview(data).cast("B")
        while view:
            big = self._big
            if big is not None:
                n = min(len(view), len(big) - self._filled)
                big[self._filled : self._filled + n] = view[:n]
                self._filled += n
                view = view[n:]
                if self._filled < len(big):
                    break
                self._big = None
                out.append((big[0], big[5:]))
                continue
            head = self._head
            if not head and len(view) >= 5:
                # a message starts here with its prefix whole: taken from ``data`` where it can be
                size = self._size(view)
                if len(view) >= 5 + size:
                    out.append((view[0], view[5 : 5 + size]))
                    view = view[5 + size :]
                elif size >= PREALLOCATE_MIN:
                    self._start_big(view, size)
                    break
                else:
                    head += view
                    break
                continue
            if len(head) < 5:
                take = 5 - len(head)
                head += view[:take]
                view = view[take:]
                if len(head) < 5:
                    break
            size = self._size(head)
            need = 5 + size - len(head)
            if need > len(view) and size >= PREALLOCATE_MIN:
                self._start_big(head, size)
                self._head = bytearray()
                continue
            head += view[:need]
            view = view[need:]
            if len(head) < 5 + size:
                break
            # the buffer is handed on with the message and replaced (a view pins its size)
            out.append((head[0], memoryview(head)[5:]))
            self._head = bytearray()
        return out

    def _size(self, prefix: bytearray | memoryview) -> int:
        size = int.from_bytes(prefix[1:5], "big")
        if size > self.limit:
            raise MessageTooLarge(size, self.limit)
        return size

    def _start_big(self, first: memoryview | bytearray, size: int) -> None:
        # np.empty: no zero-filling of memory that is about to be written whole
        big = np.empty(5 + size, dtype=np.uint8).data
        big[: len(first)] = first
        self._big = big
        self._filled = len(first)
