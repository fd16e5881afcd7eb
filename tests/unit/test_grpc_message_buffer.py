"""`servers.grpc_message_buffer`: a call's request stream cut into gRPC messages."""

from __future__ import annotations

import random

import numpy as np
import pytest

from servers.grpc_message_buffer import PREALLOCATE_MIN, MessageBuffer, MessageTooLarge

LIMIT = 8 << 20


def framed(payload: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


def feed_all(buf: MessageBuffer, pieces: list[bytes]) -> list[tuple[int, bytes]]:
    out = []
    for piece in pieces:
        out += [(flag, bytes(message)) for flag, message in buf.feed(piece)]
    return out


def cut(data: bytes, rng: random.Random, max_piece: int) -> list[bytes]:
    pieces, at = [], 0
    while at < len(data):
        n = rng.randint(1, max_piece)
        pieces.append(data[at : at + n])
        at += n
    return pieces


def test_several_messages_in_one_piece_come_out_in_order_as_views_of_it() -> None:
    data = framed(b"one") + framed(b"", flag=1) + framed(b"three")
    buf = MessageBuffer(LIMIT)
    messages = buf.feed(data)
    assert [(flag, bytes(m)) for flag, m in messages] == [(0, b"one"), (1, b""), (0, b"three")]
    assert all(m.obj is data for _, m in messages)
    assert not buf


def test_a_message_split_anywhere_comes_out_whole_once_its_last_byte_is_in() -> None:
    payload = bytes(range(256)) * 4
    data = framed(payload)
    for at in range(1, len(data)):
        buf = MessageBuffer(LIMIT)
        assert buf.feed(data[:at]) == []
        assert buf, "a started message is held"
        assert [(f, bytes(m)) for f, m in buf.feed(data[at:])] == [(0, payload)]
        assert not buf


def test_a_large_message_is_assembled_in_a_buffer_of_its_final_size() -> None:
    payload = np.random.default_rng(0).integers(0, 256, 3 * PREALLOCATE_MIN + 7, dtype=np.uint8).tobytes()
    buf = MessageBuffer(LIMIT)
    data = framed(payload)
    out = []
    for piece in cut(data, random.Random(1), 16 << 10):
        out += buf.feed(piece)
    ((flag, message),) = out
    assert flag == 0 and bytes(message) == payload
    # the payload views the one buffer it was copied into: prefix + payload, nothing more
    assert isinstance(message.obj, np.ndarray) and message.obj.nbytes == len(data)


@pytest.mark.parametrize("seed", range(20))
def test_random_cuts_of_a_stream_give_the_messages_sent(seed: int) -> None:
    rng = random.Random(seed)
    sizes = [rng.choice([0, 1, 4, 5, 100, PREALLOCATE_MIN - 1, PREALLOCATE_MIN, 200_000]) for _ in range(8)]
    sent = [(rng.randint(0, 1), rng.randbytes(n)) for n in sizes]
    data = b"".join(framed(p, f) for f, p in sent)
    buf = MessageBuffer(LIMIT)
    assert feed_all(buf, cut(data, rng, rng.choice([1, 3, 7, 1000, 70_000]))) == sent
    assert not buf


def test_a_message_over_the_limit_is_refused_from_its_prefix() -> None:
    buf = MessageBuffer(100)
    assert [bytes(m) for _, m in buf.feed(framed(b"x" * 100))] == [b"x" * 100]
    with pytest.raises(MessageTooLarge, match=r"larger than max \(101 vs. 100\)") as err:
        buf.feed(framed(b"x" * 101)[:5])
    assert err.value.size == 101


def test_a_prefix_split_over_pieces_is_checked_against_the_limit() -> None:
    buf = MessageBuffer(1000)
    prefix = framed(b"y" * 5000)[:5]
    assert buf.feed(prefix[:2]) == []
    with pytest.raises(MessageTooLarge):
        buf.feed(prefix[2:])


def test_bytes_bytearrays_and_views_are_accepted() -> None:
    data = framed(b"abc") + framed(b"de")[:3]
    buf = MessageBuffer(LIMIT)
    assert [bytes(m) for _, m in buf.feed(memoryview(bytearray(data)))] == [b"abc"]
    assert [bytes(m) for _, m in buf.feed(bytearray(framed(b"de")[3:]))] == [b"de"]
    assert [bytes(m) for _, m in buf.feed(framed(b"f"))] == [b"f"]
