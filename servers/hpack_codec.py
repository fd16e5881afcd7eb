"""HPACK (RFC 7541) for the gRPC server's own HTTP/2 layer (`servers.http2`): a decoder for the
peer's header blocks and an encoder that needs no state.

Why not `hpack`'s codec: its decoder builds a `HeaderTuple` object per field and its encoder keeps a
dynamic table it must update per response; here a request's ~8 header fields are mostly indexed
references after the first call, so decoding is a list lookup each, and the server's own answers
(``:status``, ``content-type``, ``grpc-status``) are encoded once, as constant bytes, without the
dynamic table. Huffman decoding is `hpack`'s (a well-tested table, only used for literals).
"""

from __future__ import annotations

from collections import deque

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE
_STATIC_LEN = len(STATIC_TABLE)
_STATIC_NAME_INDEX: dict[bytes, int] = {}
for _i, (_name, _) in enumerate(STATIC_TABLE, 1):
    _STATIC_NAME_INDEX.setdefault(_name, _i)
#: the per-entry overhead a dynamic table (and a header list's size) counts
ENTRY_OVERHEAD = 32
#: integers longer than this many continuation bytes are refused (28 bits is > any size we accept)
_MAX_INT_BYTES = 4
#: Huffman strings decoded before, by their encoding. Some encoders send a field as a literal every
#: time (nghttp2 never indexes ``:path``), and `decode_huffman` is pure Python: ~15 µs for a method
#: path. Short strings only, and cleared when full, so a peer sending endless new ones gains nothing.
_HUFFMAN_CACHE: dict[bytes, bytes] = {}
_HUFFMAN_CACHE_ENTRIES = 1024
_HUFFMAN_CACHE_LONGEST = 256
#: Whole header blocks decoded before, per connection (`Decoder`): a client that sets no deadline
#: sends the same bytes for every call once its headers are in the dynamic table (tritonclient by
#: default, h2load). Only blocks that leave the table as it was, short ones, a bounded number.
_BLOCK_CACHE_ENTRIES = 64
_BLOCK_CACHE_LONGEST = 1024


class HPACKError(Exception):
    """The header block is not valid HPACK (an HTTP/2 COMPRESSION_ERROR), or too large."""


def _integer(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """The integer at ``data[pos]`` with an N-bit prefix, and the position after it."""
    mask = (1 << prefix_bits) - 1
    value = data[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    for _ in range(_MAX_INT_BYTES):
        if pos >= len(data):
            raise HPACKError("truncated integer")
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise HPACKError("integer too large")


def _string(data: bytes, pos: int) -> tuple[bytes, int]:
    if pos >= len(data):
        raise HPACKError("truncated string")
    huffman = data[pos] & 0x80
    length, pos = _integer(data, pos, 7)
    end = pos + length
    if end > len(data):
        raise HPACKError("string longer than its block")
    raw = data[pos:end]
    if huffman:
        decoded = _HUFFMAN_CACHE.get(raw)
        if decoded is None:
            try:
                decoded = decode_huffman(raw)
            except Exception as exc:  # hpack's HPACKDecodingError: bad code or padding
                raise HPACKError(f"invalid Huffman string: {exc}") from None
            if length <= _HUFFMAN_CACHE_LONGEST:
                if len(_HUFFMAN_CACHE) >= _HUFFMAN_CACHE_ENTRIES:
                    _HUFFMAN_CACHE.clear()
                _HUFFMAN_CACHE[raw] = decoded
        raw = decoded
    return raw, end


class Decoder:
    """Decodes one connection's header blocks, in order (the dynamic table is shared between them).

    Args:
        max_table_size: our SETTINGS_HEADER_TABLE_SIZE: the largest dynamic table the peer may ask for.
        max_header_list_size: largest decoded header list (names + values + 32 per field) accepted.
    """

    def __init__(self, max_table_size: int = 4096, max_header_list_size: int = 64 << 10) -> None:
        self.max_table_size = max_table_size
        self.max_header_list_size = max_header_list_size
        self._table_limit = max_table_size
        self._table: deque[tuple[bytes, bytes]] = deque()
        self._table_size = 0
        #: bumped whenever the dynamic table changes: a cached block's indices meant what they mean
        #: now only if the table is the one it was decoded against
        self._version = 0
        self._blocks: dict[bytes, tuple[int, list[tuple[bytes, bytes]]]] = {}

    def decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The header list in ``data``, a whole header block (the same list for the same block
        while the dynamic table is unchanged: treat it as read-only). Raises `HPACKError`."""
        cached = self._blocks.get(data)
        if cached is not None and cached[0] == self._version:
            return cached[1]
        version = self._version
        headers = self._decode(data)
        if self._version == version and len(data) <= _BLOCK_CACHE_LONGEST:
            if len(self._blocks) >= _BLOCK_CACHE_ENTRIES:
                self._blocks.clear()
            self._blocks[data] = (version, headers)
        return headers

    def _decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = []
        size = 0
        pos = 0
        end = len(data)
        while pos < end:
            byte = data[pos]
            if byte & 0x80:  # indexed field
                index, pos = _integer(data, pos, 7)
                header = self._entry(index)
            elif byte & 0x40:  # literal, added to the table
                index, pos = _integer(data, pos, 6)
                name, pos = _string(data, pos) if index == 0 else (self._entry(index)[0], pos)
                value, pos = _string(data, pos)
                header = (name, value)
                self._add(header)
            elif byte & 0x20:  # dynamic table size update: only before the first field
                if headers:
                    raise HPACKError("table size update after a header field")
                limit, pos = _integer(data, pos, 5)
                if limit > self.max_table_size:
                    raise HPACKError(f"table size {limit} over the {self.max_table_size} allowed")
                self._table_limit = limit
                self._version += 1
                self._evict()
                continue
            else:  # literal not indexed / never indexed
                index, pos = _integer(data, pos, 4)
                name, pos = _string(data, pos) if index == 0 else (self._entry(index)[0], pos)
                value, pos = _string(data, pos)
                header = (name, value)
            size += len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
            if size > self.max_header_list_size:
                raise HPACKError(f"header list larger than {self.max_header_list_size} bytes")
            headers.append(header)
        return headers

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= _STATIC_LEN:
            return STATIC_TABLE[index - 1]
        dynamic = index - _STATIC_LEN - 1
        if index == 0 or dynamic >= len(self._table):
            raise HPACKError(f"header index {index} out of range")
        return self._table[dynamic]

    def _add(self, header: tuple[bytes, bytes]) -> None:
        self._version += 1
        self._table.appendleft(header)
        self._table_size += len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
        self._evict()

    def _evict(self) -> None:
        # an entry larger than the whole table empties it and is not kept (RFC 7541 §4.4)
        while self._table_size > self._table_limit:
            name, value = self._table.pop()
            self._table_size -= len(name) + len(value) + ENTRY_OVERHEAD


def _encode_integer(value: int, prefix_bits: int, first: int) -> bytes:
    mask = (1 << prefix_bits) - 1
    if value < mask:
        return bytes((first | value,))
    out = bytearray((first | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode(headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]]) -> bytes:
    """A header block for ``headers`` that leaves the peer's dynamic table alone: a field the static
    table holds whole is indexed, every other one is a literal without indexing (its name indexed
    when the static table has it), strings not Huffman-coded."""
    out = bytearray()
    for name, value in headers:
        try:
            out += _encode_integer(STATIC_TABLE.index((name, value)) + 1, 7, 0x80)
            continue
        except ValueError:
            pass
        index = _STATIC_NAME_INDEX.get(name, 0)
        out += _encode_integer(index, 4, 0x00)
        if not index:
            out += _encode_integer(len(name), 7, 0x00) + name
        out += _encode_integer(len(value), 7, 0x00) + value
    return bytes(out)


def table_size_update(size: int) -> bytes:
    """The instruction that tells the peer's decoder our dynamic table's new maximum size."""
    return _encode_integer(size, 5, 0x20)
