"""HPACK (RFC 7541) in servers.hpack_codec: the connection decoder against the `hpack` library as the
reference, the RFC's Appendix C examples, the stateless encoder, and every malformed input raising
`HPACKError` (never IndexError or another exception), fuzzed with fixed seeds."""

from __future__ import annotations

import copy
import random
from collections import deque
from typing import TypeVar

import hpack
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple

from servers import hpack_codec
from servers.hpack_codec import STATIC_TABLE, Decoder, HPACKError, encode, table_size_update

Header = tuple[bytes, bytes]
_D = TypeVar("_D")

#: lengths around the 7-bit, 6-bit, 5-bit and 4-bit prefix boundaries (2^N - 1) and past one
#: continuation byte (127 + 128 = 255)
_BOUNDARY_LENGTHS = (0, 1, 14, 15, 16, 30, 31, 32, 62, 63, 64, 126, 127, 128, 129, 254, 255, 256, 300)
_COMMON_NAMES = (
    b":method",
    b":scheme",
    b":path",
    b":authority",
    b"content-type",
    b"user-agent",
    b"te",
    b"grpc-timeout",
    b"grpc-encoding",
    b"accept-encoding",
    b"authorization",
    b"cookie",
    b"x-request-id",
    b"x-trace",
)
_COMMON_VALUES = (b"", b"GET", b"POST", b"/", b"http", b"https", b"application/grpc", b"trailers", b"gzip")
#: the most entries a 4096-byte dynamic table can hold (each costs at least 32)
_MAX_ENTRIES = 4096 // 32


# ---- helpers -----------------------------------------------------------------------------------------


def _indexed(index: int) -> bytes:
    """An indexed header field representation (RFC 7541 §6.1) for ``index``."""
    return _int(index, 7, 0x80)


def _int(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 §5.1 integer, written independently of the code under test."""
    mask = (1 << prefix_bits) - 1
    if value < mask:
        return bytes((first | value,))
    out = [first | mask]
    value -= mask
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _raw_string(data: bytes) -> bytes:
    """A string literal without Huffman coding (RFC 7541 §5.2)."""
    return _int(len(data), 7, 0x00) + data


def _huffman_string(coded: bytes) -> bytes:
    """A string literal whose (already Huffman-coded, possibly invalid) octets are ``coded``."""
    return _int(len(coded), 7, 0x80) + coded


def _ref_decode(decoder: hpack.Decoder, block: bytes) -> list[Header]:
    return [(bytes(name), bytes(value)) for name, value in decoder.decode(block, raw=True)]


def _plain(headers: list[HeaderTuple]) -> list[Header]:
    return [(bytes(name), bytes(value)) for name, value in headers]


def _dynamic_table(decoder: Decoder) -> list[Header]:
    """The decoder's dynamic table, newest first, read back through indexed references only (which do not
    change it): index 62 upwards until the first out-of-range index."""
    entries: list[Header] = []
    for index in range(len(STATIC_TABLE) + 1, len(STATIC_TABLE) + _MAX_ENTRIES + 2):
        try:
            entries += decoder.decode(_indexed(index))
        except HPACKError:
            return entries
    raise AssertionError("more dynamic entries than a 4096-byte table can hold")


def _table_size(entries: list[Header]) -> int:
    return sum(len(name) + len(value) + 32 for name, value in entries)


def _random_bytes(rng: random.Random, length: int, binary: bool) -> bytes:
    if binary:
        return bytes(rng.getrandbits(8) for _ in range(length))
    return bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789-_./=;, ") for _ in range(length))


def _random_length(rng: random.Random) -> int:
    return rng.choice(_BOUNDARY_LENGTHS) if rng.random() < 0.5 else rng.randint(0, 300)


class _HeaderSource:
    """Seeded header lists for one connection: common and fresh names, values of 0..300 bytes (text and
    binary), earlier fields and whole earlier lists repeated (so the encoder indexes from its dynamic
    table), and some fields sensitive (never indexed)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.names: list[bytes] = list(_COMMON_NAMES)
        self.values: list[bytes] = list(_COMMON_VALUES)
        self.fields: list[Header] = []
        self.lists: list[list[HeaderTuple]] = []

    def _name(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.75:
            return rng.choice(self.names)
        binary = rng.random() < 0.3
        name = _random_bytes(
            rng, max(1, _random_length(rng)) if rng.random() < 0.3 else rng.randint(1, 20), binary
        )
        self.names.append(name)
        return name

    def _value(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.4:
            return rng.choice(self.values)
        value = _random_bytes(rng, _random_length(rng), rng.random() < 0.3)
        self.values.append(value)
        return value

    def _field(self) -> HeaderTuple:
        rng = self.rng
        if self.fields and rng.random() < 0.3:
            name, value = rng.choice(self.fields)
        elif rng.random() < 0.1:
            name, value = rng.choice(STATIC_TABLE)
        else:
            name, value = self._name(), self._value()
            self.fields.append((name, value))
        if rng.random() < 0.1:
            return NeverIndexedHeaderTuple(name, value)
        return HeaderTuple(name, value)

    def next_list(self) -> list[HeaderTuple]:
        if self.lists and self.rng.random() < 0.25:
            return self.rng.choice(self.lists)
        headers = [self._field() for _ in range(self.rng.randint(0, 12))]
        self.lists.append(headers)
        return headers


# ---- round trip against the reference implementation ---------------------------------------------------


@pytest.mark.parametrize("huffman", [True, False], ids=["huffman", "raw"])
@pytest.mark.parametrize("seed", [1, 2])
def test_decodes_a_connection_like_the_reference(seed: int, huffman: bool) -> None:
    source = _HeaderSource(seed)
    encoder, reference, ours = hpack.Encoder(), hpack.Decoder(), Decoder()
    dynamic_hits = 0
    for n in range(150):
        headers = source.next_list()
        for name, value in headers:  # fields the encoder's dynamic table holds whole (before this list)
            match = encoder.header_table.search(name, value)
            dynamic_hits += match is not None and match[0] > len(STATIC_TABLE) and match[2] is not None
        block = encoder.encode(headers, huffman=huffman)
        decoded = ours.decode(block)
        assert decoded == _ref_decode(reference, block) == _plain(headers), f"block {n}: {block.hex()}"
        if n % 25 == 0:
            assert _dynamic_table(ours) == list(reference.header_table.dynamic_entries)
    assert dynamic_hits > 40  # the encoder did index from its dynamic table
    assert _dynamic_table(ours) == list(reference.header_table.dynamic_entries)


@pytest.mark.parametrize("huffman", [True, False], ids=["huffman", "raw"])
def test_decodes_with_a_small_table_evicting_entries(huffman: bool) -> None:
    rng = random.Random(7)
    encoder, reference, ours = hpack.Encoder(), hpack.Decoder(), Decoder(max_table_size=4096)
    encoder.header_table_size = 256  # sent as a size update at the start of the next block
    first = encoder.encode([(b"x-first", b"1")], huffman=huffman)
    assert first[0] & 0xE0 == 0x20
    assert ours.decode(first) == _ref_decode(reference, first) == [(b"x-first", b"1")]
    evicted = False
    for n in range(300):
        before = _dynamic_table(ours)
        headers = [
            (f"x-h{n}-{i}".encode(), _random_bytes(rng, rng.randint(0, 120), rng.random() < 0.3))
            for i in range(rng.randint(1, 4))
        ]
        if rng.random() < 0.3 and before:  # a repeat, indexed from the (surviving) dynamic table
            headers.append(rng.choice(before))
        block = encoder.encode(headers, huffman=huffman)
        assert ours.decode(block) == _ref_decode(reference, block) == headers, f"block {n}: {block.hex()}"
        table = _dynamic_table(ours)
        assert table == list(reference.header_table.dynamic_entries)
        assert _table_size(table) <= 256
        evicted = evicted or any(entry not in table for entry in before)
    assert evicted


def test_an_entry_larger_than_the_table_empties_it() -> None:
    encoder, reference, ours = hpack.Encoder(), hpack.Decoder(), Decoder()
    encoder.header_table_size = 256
    small = [(b"x-a", b"1"), (b"x-b", b"2")]
    block = encoder.encode(small, huffman=False)
    assert ours.decode(block) == _ref_decode(reference, block) == small
    assert _dynamic_table(ours) == [(b"x-b", b"2"), (b"x-a", b"1")]
    big = [(b"x-big", b"v" * 300)]  # 5 + 300 + 32 > 256
    block = encoder.encode(big, huffman=False)
    assert ours.decode(block) == _ref_decode(reference, block) == big
    assert _dynamic_table(ours) == [] == list(reference.header_table.dynamic_entries)
    # exactly the table's size fits, alone
    exact = [(b"x-exact", b"e" * (256 - 32 - 7))]
    block = encoder.encode(exact + small, huffman=False)
    assert ours.decode(block) == _ref_decode(reference, block) == exact + small
    assert _dynamic_table(ours) == [(b"x-b", b"2"), (b"x-a", b"1")]
    block = encoder.encode(exact, huffman=False)
    assert ours.decode(block) == exact
    assert _dynamic_table(ours) == [(b"x-exact", b"e" * 217)]


def test_follows_size_updates_between_and_within_blocks() -> None:
    source = _HeaderSource(11)
    encoder, reference, ours = hpack.Encoder(), hpack.Decoder(), Decoder()
    for n, sizes in enumerate([(), (1024,), (), (0,), (), (100, 300), (), (4096,), (), (0, 4096), ()] * 2):
        for size in sizes:
            encoder.header_table_size = size
        for _ in range(5):
            block = encoder.encode(source.next_list())
            assert ours.decode(block) == _ref_decode(reference, block), f"step {n}: {block.hex()}"
        table = _dynamic_table(ours)
        assert table == list(reference.header_table.dynamic_entries)
        assert _table_size(table) <= encoder.header_table_size


def test_reference_literal_forms_hpack_does_not_emit() -> None:
    """Literal without indexing (0000xxxx) with a dynamic name index, and never-indexed (0001xxxx) ones."""
    ours = Decoder()
    assert ours.decode(b"\x40" + _raw_string(b"x-name") + _raw_string(b"v1")) == [(b"x-name", b"v1")]
    block = _int(62, 4, 0x00) + _raw_string(b"v2") + _int(62, 4, 0x10) + _raw_string(b"v3")
    block += (
        b"\x00" + _raw_string(b"x-other") + _raw_string(b"") + b"\x10" + _raw_string(b"") + _raw_string(b"")
    )
    assert ours.decode(block) == [(b"x-name", b"v2"), (b"x-name", b"v3"), (b"x-other", b""), (b"", b"")]
    assert _dynamic_table(ours) == [(b"x-name", b"v1")]  # none of those was added


# ---- RFC 7541 Appendix C -------------------------------------------------------------------------------

_C3_REQUESTS = [
    (
        "828684410f7777772e6578616d706c652e636f6d",
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")],
        [(b":authority", b"www.example.com")],
        57,
    ),
    (
        "828684be58086e6f2d6361636865",
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"www.example.com"),
            (b"cache-control", b"no-cache"),
        ],
        [(b"cache-control", b"no-cache"), (b":authority", b"www.example.com")],
        110,
    ),
    (
        "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":path", b"/index.html"),
            (b":authority", b"www.example.com"),
            (b"custom-key", b"custom-value"),
        ],
        [
            (b"custom-key", b"custom-value"),
            (b"cache-control", b"no-cache"),
            (b":authority", b"www.example.com"),
        ],
        164,
    ),
]
_C4_REQUESTS_HUFFMAN = [
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]

_DATE_21 = (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT")
_DATE_22 = (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT")
_LOCATION = (b"location", b"https://www.example.com")
_COOKIE = (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1")
_C5_RESPONSES = [
    (
        "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d54"
        "6e1768747470733a2f2f7777772e6578616d706c652e636f6d",
        [(b":status", b"302"), (b"cache-control", b"private"), _DATE_21, _LOCATION],
        [_LOCATION, _DATE_21, (b"cache-control", b"private"), (b":status", b"302")],
        222,
    ),
    (
        "4803333037c1c0bf",
        [(b":status", b"307"), (b"cache-control", b"private"), _DATE_21, _LOCATION],
        [(b":status", b"307"), _LOCATION, _DATE_21, (b"cache-control", b"private")],
        222,
    ),
    (
        "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738666f6f3d"
        "4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d333630303b207665"
        "7273696f6e3d31",
        [
            (b":status", b"200"),
            (b"cache-control", b"private"),
            _DATE_22,
            _LOCATION,
            (b"content-encoding", b"gzip"),
            _COOKIE,
        ],
        [_COOKIE, (b"content-encoding", b"gzip"), _DATE_22],
        215,
    ),
]
_C6_RESPONSES_HUFFMAN = [
    "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3",
    "4883640effc1c0bf",
    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335dfdfcd5b3960d5af27087f"
    "3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
]


_Example = list[tuple[str, list[Header], list[Header], int]]


@pytest.mark.parametrize(
    ("blocks", "expected", "table_size"),
    [
        ([hex_block for hex_block, *_ in _C3_REQUESTS], _C3_REQUESTS, 4096),
        (_C4_REQUESTS_HUFFMAN, _C3_REQUESTS, 4096),  # C.4 is C.3 with Huffman-coded strings
        ([hex_block for hex_block, *_ in _C5_RESPONSES], _C5_RESPONSES, 256),
        (_C6_RESPONSES_HUFFMAN, _C5_RESPONSES, 256),  # C.6 is C.5 with Huffman-coded strings
    ],
    ids=["C.3-requests", "C.4-requests-huffman", "C.5-responses", "C.6-responses-huffman"],
)
def test_rfc7541_appendix_c(blocks: list[str], expected: _Example, table_size: int) -> None:
    """Each example's three blocks on one decoder: the headers, then the dynamic table (newest first) and
    its size as the RFC lists them after each block."""
    ours = Decoder(max_table_size=table_size)
    reference = hpack.Decoder()
    reference.header_table_size = table_size
    for hex_block, (_, headers, table, size) in zip(blocks, expected, strict=True):
        block = bytes.fromhex(hex_block)
        assert _ref_decode(reference, block) == headers  # the hex is the RFC's
        assert ours.decode(block) == headers
        assert _dynamic_table(ours) == table
        assert _table_size(table) == size


# ---- the stateless encoder -----------------------------------------------------------------------------


def test_encode_round_trips_and_leaves_the_dynamic_table_empty() -> None:
    source = _HeaderSource(5)
    reference, ours = hpack.Decoder(), Decoder()
    for n in range(300):
        headers = _plain(source.next_list())
        block = encode(headers)
        assert _ref_decode(reference, block) == headers, f"list {n}: {block.hex()}"
        assert ours.decode(block) == headers
        assert len(reference.header_table.dynamic_entries) == 0
    assert _dynamic_table(ours) == []
    assert encode(()) == b""


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b":status", b"200")], b"\x88"),
        ([(b":method", b"GET")], b"\x82"),
        ([(b":authority", b"")], b"\x81"),
        ([(b"www-authenticate", b"")], b"\xbd"),  # the last static entry, 61
        ([(b":status", b"200"), (b":path", b"/")], b"\x88\x84"),
        # name indexed (31 = 15 + 16), value raw: literal without indexing
        ([(b"content-type", b"application/grpc")], b"\x0f\x10\x10application/grpc"),
        ([(b":status", b"418")], b"\x08\x03418"),  # name index 8 fits the 4-bit prefix
        ([(b"grpc-status", b"0")], b"\x00\x0bgrpc-status\x010"),
    ],
)
def test_encode_exact_bytes(headers: list[Header], expected: bytes) -> None:
    assert encode(headers) == expected
    assert encode(tuple(headers)) == expected


@pytest.mark.parametrize("length", [126, 127, 128, 254, 255, 256, 300, 16383, 16384, 70000])
def test_encode_long_names_and_values(length: int) -> None:
    headers = [(b"n" * length, b"v" * length), (b"user-agent", bytes(range(256)) * (length // 256 + 1))]
    block = encode(headers)
    assert _ref_decode(hpack.Decoder(max_header_list_size=1 << 20), block) == headers
    assert Decoder(max_header_list_size=1 << 20).decode(block) == headers


@pytest.mark.parametrize(
    ("size", "expected"),
    [(0, b"\x20"), (30, b"\x3e"), (31, b"\x3f\x00"), (256, b"\x3f\xe1\x01"), (4096, b"\x3f\xe1\x1f")],
)
def test_table_size_update(size: int, expected: bytes) -> None:
    assert table_size_update(size) == expected
    block = encode([(b":status", b"200"), (b"grpc-status", b"0")])
    reference, ours = hpack.Decoder(), Decoder()
    assert _ref_decode(reference, table_size_update(size) + block) == [
        (b":status", b"200"),
        (b"grpc-status", b"0"),
    ]
    assert reference.header_table_size == size
    assert ours.decode(table_size_update(size) + block) == [(b":status", b"200"), (b"grpc-status", b"0")]


def test_table_size_update_to_zero_empties_the_peer_table() -> None:
    encoder, reference = hpack.Encoder(), hpack.Decoder()
    reference.decode(encoder.encode([(b"x-a", b"1"), (b"x-b", b"2")]))
    assert len(reference.header_table.dynamic_entries) == 2
    assert _ref_decode(reference, table_size_update(0) + encode([(b"x-a", b"1")])) == [(b"x-a", b"1")]
    assert reference.header_table_size == 0
    assert len(reference.header_table.dynamic_entries) == 0


# ---- errors ---------------------------------------------------------------------------------------------


#: adds (x-a, 1) then (x-b, 2): dynamic indices 63 and 62
_SEED_BLOCK = (
    b"\x40" + _raw_string(b"x-a") + _raw_string(b"1") + b"\x40" + _raw_string(b"x-b") + _raw_string(b"2")
)
#: integers with 5 continuation bytes, valid values otherwise (size update to 31; name index 63, then a
#: value): malformed for us only, `hpack` reads integers of any length
_LONG_INTEGERS = (b"\x3f\x80\x80\x80\x80\x00", b"\x1f\xb0\x80\x80\x80\x00\x01v")


def _seeded_decoder() -> Decoder:
    """A decoder with two dynamic entries (indices 62 and 63)."""
    decoder = Decoder()
    decoder.decode(_SEED_BLOCK)
    return decoder


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b"\x80", id="index-0"),
        pytest.param(b"\x82\x80", id="index-0-after-a-field"),
        pytest.param(_indexed(64), id="index-past-dynamic"),
        pytest.param(_indexed(4096), id="index-far-past"),
        pytest.param(_int(64, 6, 0x40) + _raw_string(b"v"), id="literal-indexed-name-past-dynamic"),
        pytest.param(_int(64, 4, 0x00) + _raw_string(b"v"), id="literal-name-past-dynamic"),
        pytest.param(_int(64, 4, 0x10) + _raw_string(b"v"), id="never-indexed-name-past-dynamic"),
        pytest.param(b"\xff", id="truncated-integer-prefix-only"),
        pytest.param(b"\xff\x80", id="truncated-integer-continuation"),
        pytest.param(b"\x0f", id="truncated-4-bit-integer"),
        pytest.param(_LONG_INTEGERS[0], id="size-update-integer-5-continuation-bytes"),
        pytest.param(_LONG_INTEGERS[1], id="name-index-5-continuation-bytes"),
        pytest.param(b"\xff\x80\x80\x80\x80\x80\x80\x80\x01", id="index-integer-far-too-long"),
        pytest.param(b"\x00\x7f\x80\x80\x80\x80\x01", id="string-length-too-long"),
        pytest.param(b"\x00", id="literal-missing-name"),
        pytest.param(b"\x40", id="indexed-literal-missing-name"),
        pytest.param(b"\x00\x01a", id="literal-missing-value"),
        pytest.param(b"\x0f\x10", id="indexed-name-missing-value"),
        pytest.param(b"\x00\x05abc", id="name-past-block-end"),
        pytest.param(b"\x40\x01a\x05abc", id="value-past-block-end"),
        pytest.param(b"\x00\x7f\x00" + b"a" * 126, id="long-name-past-block-end"),
        pytest.param(b"\x00\x81", id="huffman-name-past-block-end"),
        pytest.param(b"\x00" + _huffman_string(b"\xff\xff\xff\xff") + _raw_string(b"v"), id="huffman-eos"),
        pytest.param(
            b"\x00" + _huffman_string(b"\x1f\xff\xff\xff\xff") + _raw_string(b"v"), id="huffman-eos-after-a"
        ),
        pytest.param(
            b"\x00" + _huffman_string(b"\x1f\xff") + _raw_string(b"v"), id="huffman-padding-11-bits"
        ),
        pytest.param(b"\x00" + _huffman_string(b"\xff") + _raw_string(b"v"), id="huffman-padding-8-bits"),
        pytest.param(b"\x00" + _huffman_string(b"\x18") + _raw_string(b"v"), id="huffman-padding-zeros"),
        pytest.param(
            b"\x00" + _raw_string(b"n") + _huffman_string(b"\x1e"), id="huffman-padding-not-all-ones"
        ),
        pytest.param(table_size_update(4097), id="size-update-over-max"),
        pytest.param(b"\x82" + table_size_update(0), id="size-update-after-field"),
        pytest.param(b"\x20\x82\x20", id="size-update-after-field-after-size-update"),
        pytest.param(
            _int(62, 4, 0x00) + _raw_string(b"v") + table_size_update(100), id="size-update-after-literal"
        ),
    ],
)
def test_malformed_blocks_raise_hpack_error(block: bytes) -> None:
    with pytest.raises(HPACKError):
        _seeded_decoder().decode(block)
    if block in _LONG_INTEGERS:
        return
    reference = hpack.Decoder()
    reference.decode(_SEED_BLOCK)
    with pytest.raises(hpack.HPACKError):  # the reference agrees the block is malformed
        reference.decode(block, raw=True)


def test_the_valid_neighbours_of_the_malformed_blocks_decode() -> None:
    assert _seeded_decoder().decode(_indexed(63)) == [(b"x-a", b"1")]
    assert _seeded_decoder().decode(_indexed(62)) == [(b"x-b", b"2")]
    assert _seeded_decoder().decode(_int(63, 4, 0x10) + _raw_string(b"v")) == [(b"x-a", b"v")]
    # 4 continuation bytes (redundant zeros) are still accepted
    assert _seeded_decoder().decode(b"\x3f\x80\x80\x80\x00") == []
    name_index_63 = b"\x1f\xb0\x80\x80\x00"  # 15 + 48, padded with zero continuation bytes
    assert _seeded_decoder().decode(name_index_63 + _raw_string(b"v")) == [(b"x-a", b"v")]
    assert Decoder().decode(b"\x00" + _huffman_string(b"\x1f") + _huffman_string(b"")) == [(b"a", b"")]
    assert Decoder().decode(table_size_update(4096) + table_size_update(0) + b"\x82") == [
        (b":method", b"GET")
    ]
    assert Decoder(max_table_size=0).decode(table_size_update(0)) == []


def test_size_updates_evict_and_limit_the_table() -> None:
    ours = _seeded_decoder()
    assert _dynamic_table(ours) == [(b"x-b", b"2"), (b"x-a", b"1")]  # 36 bytes each
    assert ours.decode(table_size_update(71)) == []
    assert _dynamic_table(ours) == [(b"x-b", b"2")]  # the oldest is evicted first
    assert ours.decode(table_size_update(0) + table_size_update(4096)) == []
    assert _dynamic_table(ours) == []
    ours.decode(_SEED_BLOCK)
    assert ours.decode(table_size_update(36)) == []
    ours.decode(b"\x40" + _raw_string(b"x-c") + _raw_string(b"3"))  # evicts (x-b, 2) to fit in 36
    assert _dynamic_table(ours) == [(b"x-c", b"3")]


def test_size_update_over_a_smaller_max() -> None:
    ours = Decoder(max_table_size=256)
    assert ours.decode(table_size_update(256)) == []
    with pytest.raises(HPACKError):
        ours.decode(table_size_update(257))


def test_header_list_size_limit() -> None:
    # name + value + 32 per field; exactly the limit is accepted, one byte more is not
    assert Decoder(max_header_list_size=100).decode(b"\x00" + _raw_string(b"n" * 30) + _raw_string(b"v" * 38))
    with pytest.raises(HPACKError):
        Decoder(max_header_list_size=100).decode(b"\x00" + _raw_string(b"n" * 30) + _raw_string(b"v" * 39))
    # counted over the list, indexed fields included
    limit = 2 * (len(b":method") + len(b"GET") + 32)
    assert Decoder(max_header_list_size=limit).decode(b"\x82\x82") == [(b":method", b"GET")] * 2
    with pytest.raises(HPACKError):
        Decoder(max_header_list_size=limit).decode(b"\x82\x82\x82")
    # a small block expanding into a large list (indexed references to one big entry)
    ours = Decoder()
    block = b"\x40" + _raw_string(b"x-big") + _raw_string(b"v" * 3000) + _indexed(62) * 40
    with pytest.raises(HPACKError):
        ours.decode(block)


# ---- fuzz -----------------------------------------------------------------------------------------------


def _clone(decoder: _D) -> _D:
    """A copy of a decoder's state (its dynamic table), as fast as a shallow copy: the entries are
    immutable, only the containers and objects holding them are copied."""
    clone = copy.copy(decoder)
    for key, value in vars(decoder).items():
        if isinstance(value, deque | list | dict):
            setattr(clone, key, copy.copy(value))
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            setattr(clone, key, _clone(value))
    return clone


def _decode_or_hpack_error(decoder: Decoder, block: bytes) -> list[Header] | None:
    try:
        headers = decoder.decode(block)
    except HPACKError:
        return None
    assert all(type(name) is bytes and type(value) is bytes for name, value in headers)
    return headers


def _reference_or_none(decoder: hpack.Decoder, block: bytes) -> list[Header] | None:
    try:
        return _ref_decode(decoder, block)
    except Exception:  # the reference may raise anything; only its successes are compared
        return None


def test_fuzz_random_bytes_only_raise_hpack_error() -> None:
    rng = random.Random(1234)
    base, reference_base = _seeded_decoder(), hpack.Decoder()
    reference_base.decode(_SEED_BLOCK)
    decoded = 0
    for _ in range(2000):
        block = rng.randbytes(rng.randint(0, 64))
        ours, reference = _clone(base), _clone(reference_base)
        headers = _decode_or_hpack_error(ours, block)
        if headers is not None:
            decoded += 1
            assert headers == _reference_or_none(reference, block), block.hex()
    assert decoded > 0


@pytest.mark.parametrize("huffman", [True, False], ids=["huffman", "raw"])
def test_fuzz_mutated_blocks_only_raise_hpack_error(huffman: bool) -> None:
    rng = random.Random(99 + huffman)
    source = _HeaderSource(42)
    encoder = hpack.Encoder()
    ours, reference = Decoder(), hpack.Decoder()
    states: list[tuple[Decoder, hpack.Decoder, bytes]] = []
    snapshots: list[list[Header]] = []
    for _ in range(40):  # a connection's states, each with the next valid block
        block = encoder.encode(source.next_list(), huffman=huffman)
        states.append((_clone(ours), _clone(reference), block))
        snapshots.append(_dynamic_table(ours))
        ours.decode(block)
        reference.decode(block, raw=True)
    agreed = 0
    for _ in range(1000):
        state, reference_state, block = rng.choice(states)
        data = bytearray(block)
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(6)
            pos = rng.randint(0, len(data))
            if op == 0 and data:  # flip a bit
                data[pos % len(data)] ^= 1 << rng.randrange(8)
            elif op == 1 and data:  # replace a byte
                data[pos % len(data)] = rng.getrandbits(8)
            elif op == 2:  # insert bytes
                data[pos:pos] = rng.randbytes(rng.randint(1, 4))
            elif op == 3:  # delete bytes
                del data[pos : pos + rng.randint(1, 4)]
            elif op == 4:  # truncate
                del data[pos:]
            else:  # an interesting byte
                data[pos:pos] = bytes(
                    [rng.choice([0x00, 0x0F, 0x10, 0x1F, 0x20, 0x3F, 0x40, 0x7F, 0x80, 0xFF])]
                )
        mutated = bytes(data)
        ours_copy, reference_copy = _clone(state), _clone(reference_state)
        headers = _decode_or_hpack_error(ours_copy, mutated)
        if headers is not None:
            assert headers == _reference_or_none(reference_copy, mutated), mutated.hex()
            assert _dynamic_table(ours_copy) == list(reference_copy.header_table.dynamic_entries)
            agreed += 1
    assert agreed > 0
    assert [_dynamic_table(state) for state, _, _ in states] == snapshots  # the clones were independent


def test_huffman_strings_decoded_before_come_from_a_bounded_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    # some encoders send the same literal every request (nghttp2 never indexes :path): decoded once
    monkeypatch.setattr(hpack_codec, "_HUFFMAN_CACHE", {})
    monkeypatch.setattr(hpack_codec, "_HUFFMAN_CACHE_ENTRIES", 4)
    path = (b":path", b"/inference.GRPCInferenceService/ModelInfer")
    block = hpack.Encoder().encode([path], huffman=True)  # a fresh encoder: a literal every time
    decoder = hpack_codec.Decoder()
    assert decoder.decode(block) == [path]
    assert decoder.decode(block) == [path]
    assert list(hpack_codec._HUFFMAN_CACHE.values()) == [path[1]]  # the name is the static table's
    for i in range(10):  # new strings: the cache is emptied when full, never grows past its bound
        decoder.decode(hpack.Encoder().encode([(b"x-key", b"value %d" % i)], huffman=True))
        assert len(hpack_codec._HUFFMAN_CACHE) <= 4
    assert decoder.decode(block) == [path]
    with pytest.raises(hpack_codec.HPACKError):  # an invalid string is refused, cached or not
        decoder.decode(b"\x00\x81\xff\x81\xff")


def test_a_block_seen_before_is_decoded_once_while_the_table_is_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a client without deadlines sends the same block every call once its headers are indexed
    decoder = Decoder()
    path = (b":path", b"/inference.GRPCInferenceService/ModelInfer")
    first = decoder.decode(_int(0, 6, 0x40) + _raw_string(b"x-client") + _raw_string(b"tc"))  # indexed
    assert first == [(b"x-client", b"tc")]
    block = _indexed(2) + _indexed(62) + _int(4, 4, 0x00) + _raw_string(path[1])
    expected = [(b":method", b"GET"), (b"x-client", b"tc"), path]
    calls = 0
    real = Decoder._decode

    def counting(self: Decoder, data: bytes) -> list[Header]:
        nonlocal calls
        calls += 1
        return real(self, data)

    monkeypatch.setattr(Decoder, "_decode", counting)
    assert decoder.decode(block) == expected
    assert decoder.decode(block) is decoder.decode(block)
    assert calls == 1


def test_a_cached_block_follows_the_dynamic_table() -> None:
    decoder = Decoder()
    newest = _indexed(62)  # the dynamic table's newest entry, whatever it is now
    decoder.decode(_int(0, 6, 0x40) + _raw_string(b"x-a") + _raw_string(b"1"))
    assert decoder.decode(newest) == [(b"x-a", b"1")]
    assert decoder.decode(newest) == [(b"x-a", b"1")]
    decoder.decode(_int(0, 6, 0x40) + _raw_string(b"x-b") + _raw_string(b"2"))  # a new entry
    assert decoder.decode(newest) == [(b"x-b", b"2")]
    # a block that adds an entry itself is decoded again every time: its second field sees the first
    adds = _int(0, 6, 0x40) + _raw_string(b"x-c") + _raw_string(b"3") + _indexed(63)
    assert decoder.decode(adds) == [(b"x-c", b"3"), (b"x-b", b"2")]
    assert decoder.decode(adds) == [(b"x-c", b"3"), (b"x-c", b"3")]
    # a size update that empties the table: the index is out of range, cached or not
    decoder.decode(table_size_update(0))
    with pytest.raises(HPACKError):
        decoder.decode(newest)


def test_the_block_cache_is_bounded() -> None:
    decoder = Decoder()
    for i in range(3 * hpack_codec._BLOCK_CACHE_ENTRIES):
        block = _int(0, 4, 0x00) + _raw_string(b"x-n") + _raw_string(b"%d" % i)  # not indexed
        assert decoder.decode(block) == [(b"x-n", b"%d" % i)]
        assert len(decoder._blocks) <= hpack_codec._BLOCK_CACHE_ENTRIES
    long = _int(0, 4, 0x00) + _raw_string(b"x-long") + _raw_string(b"v" * hpack_codec._BLOCK_CACHE_LONGEST)
    decoder.decode(long)
    assert long not in decoder._blocks
