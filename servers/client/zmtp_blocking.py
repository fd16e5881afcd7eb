"""One endpoint's ZMQ DEALER connection for the blocking client: ZMTP 3.1 (`servers.zmtp`) on a
non-blocking TCP socket, driven by the client's own `selectors` poll. No libzmq, so no I/O thread:
a request is one ``sendmsg`` from the caller's thread and its reply one ``recv`` (pyzmq's blocking
DEALER cost ~250 µs of CPU per request at one in flight, a quarter of it in libzmq's I/O thread).

A `BlockingLink` connects without blocking (`start_connect`), finishes the TCP connect and the
handshake as the poll reports its socket ready (`on_writable`, `on_readable`), and reports the
events that matter to the client through callbacks: ``on_up`` (handshake complete), ``on_message``
(a reply's frames) and ``on_lost`` (the connection ended; the link is down and may connect again
at once when it had been up a while, else after `RECONNECT_INTERVAL_S`). Host names resolve IPv4
first, as libzmq does.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from collections.abc import Callable, Sequence

from servers.client.zmq_common import RECONNECT_IVL_MS
from servers.client.zmtp_dealer import HIGH_WATER_BYTES, DealerZmtp
from servers.gateway_api import Buffer
from servers.zmtp import ZmtpError

#: how long a link that failed to connect (or dropped right after) waits before it tries again
RECONNECT_INTERVAL_S = RECONNECT_IVL_MS / 1000
#: bytes asked of the kernel per read
RECV_BYTES = 1 << 18
#: reads per readiness report before the poll looks at the other sockets
READS_PER_EVENT = 16
#: buffers per sendmsg (the kernel's IOV_MAX is 1024)
IOV_MAX = 1024

DOWN, CONNECTING, HANDSHAKE, UP = range(4)


class _Dealer(DealerZmtp):
    def __init__(self, link: BlockingLink) -> None:
        super().__init__()
        self._link = link

    def on_ready(self) -> None:
        self._link.state = UP
        self._link.up_since = time.monotonic()
        self._link.on_up()

    def on_message(self, frames: list[memoryview], nbytes: int) -> None:
        self._link.on_message(frames)


class BlockingLink:
    """One DEALER connection to ``host:port``, registered in ``selector`` (with ``data`` as its key's
    data) while it has a socket."""

    def __init__(
        self,
        host: str,
        port: int,
        selector: selectors.BaseSelector,
        data: object,
        *,
        on_up: Callable[[], None],
        on_message: Callable[[list[memoryview]], None],
        on_lost: Callable[[str], None],
    ) -> None:
        self.host = host
        self.port = port
        self.selector = selector
        self.data = data
        self.on_up = on_up
        self.on_message = on_message
        self.on_lost = on_lost
        self.state = DOWN
        #: time.monotonic() from which a link that is down may connect again
        self.retry_at = 0.0
        #: time.monotonic() of the current connection's handshake
        self.up_since = 0.0
        self.sock: socket.socket | None = None
        #: why the last connection (or connect) ended, for logs
        self.reason = ""
        self._zmtp: _Dealer | None = None
        self._out: list[memoryview] = []  # queued bytes the kernel has not taken yet
        self._out_bytes = 0
        self._events = 0  # what the selector watches for this socket

    # -- connecting --------------------------------------------------------------------------------

    def start_connect(self) -> None:
        """Start a non-blocking connect (the poll finishes it); on failure the link stays down."""
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self._down(f"cannot resolve {self.host!r}: {exc}")
            return
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(address)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._down(f"connect failed: {errno.errorcode.get(err, err)}")
            return
        self.sock = sock
        self._zmtp = _Dealer(self)
        self._take_output()  # the greeting
        self.state = CONNECTING
        self._watch()

    def on_writable(self) -> None:
        """The poll found the socket writable: a connect completed, or there is room for more."""
        sock = self.sock
        if sock is None:
            return
        if self.state == CONNECTING:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.fail(f"connect failed: {errno.errorcode.get(err, err)}")
                return
            self.state = HANDSHAKE
        self.flush()

    def on_readable(self) -> None:
        """The poll found data (or the end of the connection): parse it, answer PINGs."""
        for _ in range(READS_PER_EVENT):
            sock, zmtp = self.sock, self._zmtp
            if sock is None or zmtp is None or self.state == CONNECTING:
                return
            try:
                data = sock.recv(RECV_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.fail(f"connection error: {exc}")
                return
            if not data:
                self.fail("the server closed the connection")
                return
            try:
                zmtp.receive(data)
            except ZmtpError as exc:
                self._take_output()  # the ERROR command
                self.flush()
                self.fail(f"ZMTP protocol error: {exc}")
                return
            if self.sock is not None and zmtp.has_output():  # a PONG
                self._take_output()
                self.flush()
            if len(data) < RECV_BYTES:
                return

    # -- sending -----------------------------------------------------------------------------------

    def can_send(self) -> bool:
        """Whether the connection is up and has room for a message now."""
        return self.state == UP and self._out_bytes < HIGH_WATER_BYTES

    def send(self, frames: Sequence[Buffer], flush: bool = True) -> None:
        """Queue one message (only when `can_send`); with ``flush`` write what the kernel takes now."""
        assert self._zmtp is not None
        self._zmtp.send_message(frames)
        self._take_output()
        if flush:
            self.flush()
        else:
            self._watch()  # the next poll writes it, if the caller does not flush first

    def flush(self) -> None:
        """Write what the kernel takes now; the poll watches for room for the rest."""
        sock = self.sock
        out = self._out
        while out and sock is not None:
            try:
                sent = sock.sendmsg(out[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self.fail(f"connection error: {exc}")
                return
            self._out_bytes -= sent
            done = 0
            while sent:
                size = out[done].nbytes
                if sent >= size:
                    sent -= size
                    done += 1
                else:
                    out[done] = out[done][sent:]
                    sent = 0
            del out[:done]
        self._watch()

    # -- ending ------------------------------------------------------------------------------------

    def fail(self, reason: str) -> None:
        """End the connection and tell the client. A connection that had been up a while may be
        made again at once; one that failed to connect, or dropped soon after its handshake, waits
        `RECONNECT_INTERVAL_S`."""
        lasted = self.state == UP and time.monotonic() - self.up_since >= RECONNECT_INTERVAL_S
        self.close()
        self._down(reason)
        if lasted:
            self.retry_at = 0.0
        self.on_lost(reason)

    def close(self) -> None:
        """Close the socket (nothing is reported)."""
        sock, self.sock = self.sock, None
        if sock is not None:
            if self._events:
                self.selector.unregister(sock)
                self._events = 0
            sock.close()
        self._zmtp = None
        self._out.clear()
        self._out_bytes = 0
        self.state = DOWN

    def _down(self, reason: str) -> None:
        self.state = DOWN
        self.retry_at = time.monotonic() + RECONNECT_INTERVAL_S
        self.reason = reason

    def _take_output(self) -> None:
        assert self._zmtp is not None
        for buf in self._zmtp.data_to_send():
            view = memoryview(buf)  # type: ignore[arg-type]
            if view.ndim != 1 or view.format != "B":
                view = view.cast("B")
            if view.nbytes:
                self._out.append(view)
                self._out_bytes += view.nbytes

    def _watch(self) -> None:
        sock = self.sock
        if sock is None:
            return
        want = selectors.EVENT_READ
        if self.state == CONNECTING or self._out:
            want |= selectors.EVENT_WRITE
        if want != self._events:
            if self._events:
                self.selector.modify(sock, want, self.data)
            else:
                self.selector.register(sock, want, self.data)
            self._events = want


__all__ = ["DOWN", "RECONNECT_INTERVAL_S", "UP", "BlockingLink"]
