"""ModelInferRequest parsing that leaves large ``raw_input_contents`` where they arrived.

protobuf copies a bytes field twice on its way to the gateway: into its arena when it parses, and
into a new ``bytes`` each time ``raw_input_contents[i]`` is read. For a 4 MiB tensor that is two more
4 MiB allocations per request, each paying its page faults. A large request is therefore scanned
first: its top-level fields (a handful) are walked, the ``raw_input_contents`` payloads are kept as
views of the received message, and only the rest, a few hundred bytes, goes to protobuf. Anything
the scan does not follow (a truncated field, a group, field 7 that is not length-delimited) goes to
protobuf whole, which judges it as before.
"""

from __future__ import annotations

from typing import Any

from protos import grpc_service_pb2 as pb

#: ``ModelInferRequest.raw_input_contents``
RAW_INPUT_CONTENTS = 7
#: below this the copies cost less than the scan
SCAN_MIN_BYTES = 64 << 10

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class InferRequestViews:
    """A ModelInferRequest whose ``raw_input_contents`` are views of the received message; every
    other field is read from ``message``, the request parsed without them."""

    __slots__ = ("message", "raw_input_contents")

    def __init__(self, message: pb.ModelInferRequest, raw_input_contents: list[memoryview]) -> None:
        self.message = message
        self.raw_input_contents = raw_input_contents

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


def parse_infer_request(data: bytes | memoryview) -> pb.ModelInferRequest | InferRequestViews:
    """A ModelInferRequest from its wire bytes; large raw contents stay views of ``data``.

    Raises:
        google.protobuf.message.DecodeError: ``data`` is not a ModelInferRequest.
    """
    if len(data) < SCAN_MIN_BYTES:
        return pb.ModelInferRequest.FromString(data)
    split = split_field(data, RAW_INPUT_CONTENTS)
    if split is None or not split[1]:
        return pb.ModelInferRequest.FromString(data)
    rest, raw = split
    return InferRequestViews(pb.ModelInferRequest.FromString(rest), raw)


def split_field(data: bytes | memoryview, number: int) -> tuple[bytes, list[memoryview]] | None:
    """The top-level fields of a serialized message without the length-delimited field ``number``,
    and views of that field's payloads in order; None where the wire format is not followed."""
    view = memoryview(data)
    end = len(view)
    kept: list[memoryview] = []
    taken: list[memoryview] = []
    start = pos = 0
    while pos < end:
        head = pos
        key, pos = _varint(view, pos, end)
        if key < 0:
            return None
        wire = key & 7
        if key >> 3 == 0:
            return None
        if wire == _LEN:
            length, pos = _varint(view, pos, end)
            if length < 0:
                return None
            body = pos
            pos += length
        elif wire == _VARINT:
            value, pos = _varint(view, pos, end)
            if value < 0:
                return None
        elif wire == _I64:
            pos += 8
        elif wire == _I32:
            pos += 4
        else:
            return None  # groups: protobuf decides
        if pos > end:
            return None
        if key >> 3 == number:
            if wire != _LEN:
                return None
            kept.append(view[start:head])
            taken.append(view[body:pos])
            start = pos
    kept.append(view[start:])
    return b"".join(kept), taken


def _varint(view: memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; -1 when it is truncated or over 10 bytes."""
    value = shift = 0
    while pos < end and shift < 70:
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, pos
