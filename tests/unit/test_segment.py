"""Tests of ext.segment: creation mode and name, attach checks, idempotent close/unlink, view lifetimes."""

from __future__ import annotations

import mmap
import os
import re
import stat
import struct
from collections.abc import Callable

import numpy as np
import pytest

from ext.segment import (
    KIND_ARENA,
    KIND_TEST,
    LAYOUT_VERSION,
    NAME_PREFIX,
    SEGMENT_HEADER_SIZE,
    LayoutMismatch,
    Segment,
    SegmentError,
    segment_info,
    unlink_segment,
)

MakeSegment = Callable[..., Segment]
VERSION_OFFSET = 8  # eng_seg_header_t: u64 magic, then u32 version (engine_layout.h)


def _patch_header(name: str, offset: int, fmt: str, value: int) -> None:
    """Write into a segment's header through a raw mapping, as a foreign or older build would."""
    fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
    try:
        with mmap.mmap(fd, SEGMENT_HEADER_SIZE) as raw:
            struct.pack_into(fmt, raw, offset, value)
    finally:
        os.close(fd)


def test_create_is_private_and_unguessable(segment_factory: MakeSegment) -> None:
    a = segment_factory(4096)
    b = segment_factory(4096)
    for seg in (a, b):
        assert re.fullmatch(re.escape(NAME_PREFIX) + "[0-9a-f]{32}", seg.name)
        st = os.stat(f"/dev/shm/{seg.name}")
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_size == 4096 + SEGMENT_HEADER_SIZE
        assert seg.owner and seg.writable and seg.size == 4096 and not seg.closed
    assert a.name != b.name


def test_create_rejects_a_non_positive_size() -> None:
    for size in (0, -1):
        with pytest.raises(ValueError):
            Segment.create(size, KIND_TEST)


def test_attach_sees_the_same_bytes(segment_factory: MakeSegment) -> None:
    seg = segment_factory(1 << 16, KIND_TEST)
    seg.store_u64(64, 0xDEADBEEF)
    np.frombuffer(seg.buffer(), np.uint8)[1000:1004] = [1, 2, 3, 4]
    other = Segment.attach(seg.name, KIND_TEST)
    try:
        assert not other.owner and other.kind == KIND_TEST and other.size == seg.size
        assert other.creator_pid == os.getpid()
        assert other.load_u64(64) == 0xDEADBEEF
        assert bytes(other.buffer()[1000:1004]) == b"\x01\x02\x03\x04"
        other.store_u32(128, 7)  # and back the other way
        assert seg.load_u32(128) == 7
    finally:
        other.close()


def test_segment_info_reads_the_header(segment_factory: MakeSegment) -> None:
    seg = segment_factory(8192, KIND_ARENA)
    info = segment_info(seg.name)
    assert info["kind"] == KIND_ARENA
    assert info["version"] == LAYOUT_VERSION
    assert info["size"] == 8192 + SEGMENT_HEADER_SIZE
    assert info["creator_pid"] == os.getpid()


def test_read_only_attach_refuses_stores(segment_factory: MakeSegment) -> None:
    seg = segment_factory(4096)
    reader = Segment.attach(seg.name, KIND_TEST, writable=False)
    try:
        assert not reader.writable
        with pytest.raises(PermissionError):
            reader.store_u64(0, 1)
        assert reader.load_u64(0) == 0
    finally:
        reader.close()


def test_attach_missing_name_raises() -> None:
    with pytest.raises(SegmentError):
        Segment.attach(NAME_PREFIX + "0" * 32)


def test_attach_refuses_another_layout_version(segment_factory: MakeSegment) -> None:
    seg = segment_factory(4096)
    _patch_header(seg.name, VERSION_OFFSET, "<I", LAYOUT_VERSION + 1)
    with pytest.raises(LayoutMismatch, match="layout version"):
        Segment.attach(seg.name)


def test_attach_refuses_another_kind(segment_factory: MakeSegment) -> None:
    seg = segment_factory(4096, KIND_TEST)
    with pytest.raises(LayoutMismatch, match="kind"):
        Segment.attach(seg.name, KIND_ARENA)


def test_attach_refuses_a_foreign_file() -> None:
    name = f"{NAME_PREFIX}foreign-{os.getpid()}"
    fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, 2 * SEGMENT_HEADER_SIZE)  # zero-filled: no magic
        with pytest.raises(LayoutMismatch):
            Segment.attach(name)
        os.ftruncate(fd, 16)  # shorter than a header
        with pytest.raises(LayoutMismatch):
            Segment.attach(name)
    finally:
        os.close(fd)
        unlink_segment(name)


def test_out_of_range_access_raises(segment_factory: MakeSegment) -> None:
    seg = segment_factory(4096)
    for offset in (-8, 4096, 4090, 1 << 62):
        with pytest.raises(IndexError):
            seg.load_u64(offset)
    with pytest.raises(ValueError, match="aligned"):
        seg.load_u64(4)


def test_close_and_unlink_twice_are_safe() -> None:
    seg = Segment.create(4096, KIND_TEST)
    seg.close()
    seg.close()
    assert seg.closed
    with pytest.raises(ValueError, match="closed"):
        seg.load_u64(0)
    seg.unlink()
    seg.unlink()
    assert unlink_segment(seg.name) is False
    assert not os.path.exists(f"/dev/shm/{seg.name}")


def test_context_manager_unlinks_when_owner() -> None:
    with Segment.create(4096, KIND_TEST) as seg:
        name = seg.name
        with Segment.attach(name) as other:
            assert other.load_u64(0) == 0
        assert os.path.exists(f"/dev/shm/{name}")  # an attacher's exit never unlinks
    assert not os.path.exists(f"/dev/shm/{name}")


def test_views_outlive_close_and_unlink() -> None:
    seg = Segment.create(4096, KIND_TEST)
    try:
        view = np.frombuffer(seg.buffer(), np.uint8)
        view[:4] = [9, 8, 7, 6]
    finally:
        seg.close()
        seg.unlink()
    # the mapping stays until the last view goes: reading and writing it is still fine
    assert view[:4].tolist() == [9, 8, 7, 6]
    view[4] = 5
    assert int(view[4]) == 5
