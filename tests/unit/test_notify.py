"""Tests of ext.notify: WakeWord timeouts and wake-ups, wait_rings, idle CPU, EventNotifier arming."""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from ext.notify import WORD_SIZE, EventNotifier, WakeWord, eventfd_open, wait_rings
from ext.ring import Ring, ring_footprint
from ext.segment import KIND_TEST, Segment

MakeSegment = Callable[..., Segment]
RING_AT = 4096
SECOND_RING_AT = RING_AT + ring_footprint(8)


@pytest.fixture
def seg(segment_factory: MakeSegment) -> Segment:
    return segment_factory(SECOND_RING_AT + ring_footprint(8))


@pytest.fixture
def efd() -> Iterator[int]:
    fd = eventfd_open()
    yield fd
    os.close(fd)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll a condition another thread will make true (a bounded wait, not a sleep)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


def test_wait_times_out_when_nothing_happens(seg: Segment) -> None:
    word = WakeWord(seg, 0)
    ring = Ring.create(seg, RING_AT, 8)
    word.wait(0.02)
    assert not word.sleeping  # the waiter's announcement is withdrawn on the way out
    assert wait_rings(word, [ring], 50e-6, 0.02) is False
    assert wait_rings(word, [ring], 0.0, 0.0) is False
    assert wait_rings(word, [], 0.0, 0.01) is False


def test_waiting_idles(seg: Segment) -> None:
    word = WakeWord(seg, 0)
    ring = Ring.create(seg, RING_AT, 8)
    cpu0, wall0 = time.process_time(), time.monotonic()
    while time.monotonic() - wall0 < 1.0:
        assert wait_rings(word, [ring], 50e-6, 0.2) is False
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    assert cpu < 0.05 * wall, f"idle wait used {cpu:.3f} s of CPU in {wall:.3f} s"


def test_returns_at_once_when_a_ring_holds_something(seg: Segment) -> None:
    word = WakeWord(seg, 0)
    first = Ring.create(seg, RING_AT, 8)
    second = Ring.create(seg, SECOND_RING_AT, 8)
    second.push(1, 0, 1)
    # a 1-hour timeout: returning proves it did not wait for it
    assert wait_rings(word, [first, second], 0.0, 3600.0) is True
    assert wait_rings(word, [first, second], 1.0, 3600.0) is True
    second.pop()
    assert wait_rings(word, [first, second], 0.0, 0.0) is False


def test_notify_wakes_a_sleeping_waiter(seg: Segment) -> None:
    word = WakeWord(seg, 0)
    producer = Ring.create(seg, RING_AT, 8)
    consumer = Ring.attach(seg, RING_AT)
    seq_before = seg.load_u32(0)
    word.notify()  # nobody sleeps: no syscall, no change
    assert seg.load_u32(0) == seq_before
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(wait_rings(word, [consumer], 0.0, 3600.0)))
    waiter.start()
    try:
        wait_until(lambda: word.sleeping)
        assert producer.push(1, 0, 42)
        word.notify()
        waiter.join(30)
        assert not waiter.is_alive(), "notify did not wake the waiter"
    finally:
        if waiter.is_alive():
            word.wake()
            waiter.join(30)
    assert result == [True]
    assert seg.load_u32(0) == seq_before + 1
    assert not word.sleeping
    assert consumer.pop() == (1, 0, 42, 0, 0, 0, 0, 0, 0, 0)


def test_wake_interrupts_a_plain_wait(seg: Segment) -> None:
    word = WakeWord(seg, 0)
    waiter = threading.Thread(target=word.wait, args=(3600.0,))
    waiter.start()
    try:
        wait_until(lambda: word.sleeping)
        word.wake()
        waiter.join(30)
        assert not waiter.is_alive()
    finally:
        if waiter.is_alive():
            word.wake()
            waiter.join(30)


def test_doze_is_deaf_to_notify_and_woken_by_wake(seg: Segment) -> None:
    word = WakeWord(seg, 0)
    seq_before = seg.load_u32(0)
    done = threading.Event()

    def doze() -> None:
        word.doze(3600.0)
        done.set()

    dozer = threading.Thread(target=doze)
    dozer.start()
    try:
        assert not word.sleeping  # a dozer does not announce itself ...
        word.notify()  # ... so a producer's notify costs nothing and changes nothing
        assert seg.load_u32(0) == seq_before
        assert not done.wait(0.05)
        word.wake()  # control wake-ups (shutdown) still reach it
        dozer.join(30)
        assert not dozer.is_alive(), "wake() did not end the doze"
    finally:
        if dozer.is_alive():
            word.wake()
            dozer.join(30)


def test_doze_times_out(seg: Segment) -> None:
    word = WakeWord(seg, 0)
    word.doze(0.01)
    word.doze(0.0)  # no wait at all
    word.doze(-1.0)
    assert not word.sleeping


def test_wait_rings_argument_checks(seg: Segment) -> None:
    word = WakeWord(seg, 0)
    with pytest.raises(TypeError):
        wait_rings(word, [object()], 0.0, 0.0)  # type: ignore[list-item]


def test_placement_is_checked(seg: Segment) -> None:
    with pytest.raises(IndexError):
        WakeWord(seg, seg.size - WORD_SIZE + 64)
    with pytest.raises(ValueError, match="aligned"):
        WakeWord(seg, 32)
    with pytest.raises(IndexError):
        EventNotifier(seg, seg.size, 0)
    with pytest.raises(ValueError, match="aligned"):
        EventNotifier(seg, 2, 0)
    reader = Segment.attach(seg.name, KIND_TEST, writable=False)
    try:
        with pytest.raises(PermissionError):
            WakeWord(reader, 0)
        with pytest.raises(PermissionError):
            EventNotifier(reader, 64, 0)
    finally:
        reader.close()


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_event_notifier_signals_once_per_arm(seg: Segment, efd: int) -> None:
    consumer = EventNotifier(seg, 64, efd)
    producer = EventNotifier(seg, 64, efd)
    assert consumer.fileno() == efd
    assert not consumer.is_armed
    assert producer.signal() is False  # not armed: no write
    assert consumer.drain() == 0 and not _readable(efd)

    consumer.arm()
    assert producer.is_armed
    assert producer.signal() is True
    assert producer.signal() is False  # once per arm: a burst of completions costs one write
    assert not consumer.is_armed and _readable(efd)
    assert consumer.drain() == 1
    assert consumer.drain() == 0 and not _readable(efd)

    for _ in range(3):  # the counter adds up until drained
        consumer.arm()
        assert producer.signal() is True
    assert consumer.drain() == 3

    consumer.arm()
    consumer.disarm()
    assert producer.signal() is False
    assert consumer.drain() == 0


def test_eventfd_open_gives_a_nonblocking_cloexec_fd(efd: int) -> None:
    assert os.get_blocking(efd) is False
    assert os.get_inheritable(efd) is False
