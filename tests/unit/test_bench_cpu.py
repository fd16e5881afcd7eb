"""CPU accounting of the benchmark's processes (`bench.load_server.cpu_seconds`)."""

from __future__ import annotations

import subprocess
import sys

from bench.load_server import _tick_seconds, cpu_seconds

# a thread burns 0.25 s of CPU (by its own clock) and ends; the process then waits to be read
CHILD = """
import sys, threading, time
def burn():
    while time.thread_time() < 0.25:
        pass
t = threading.Thread(target=burn)
t.start()
t.join()
print(time.process_time(), flush=True)
sys.stdin.read()
"""


def test_cpu_seconds_counts_every_thread_to_below_a_tick_and_nothing_once_gone() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        own = float(child.stdout.readline())  # the child's CPU by its own clock, after the thread
        used = cpu_seconds(child.pid)
        # the ended thread's 0.25 s is counted (a sum over the live threads' schedstat would not),
        # and to well below /proc/PID/stat's 10 ms ticks: the child only printed and waited since
        assert own >= 0.25
        assert own <= used <= own + 0.005
        assert abs(used - _tick_seconds(child.pid)) <= 0.02
        assert cpu_seconds(child.pid) >= used  # it only grows
    finally:
        child.kill()
        child.wait()
    assert cpu_seconds(child.pid) == 0.0
