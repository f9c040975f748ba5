"""Plain non-blocking TCP sockets for the proxy driver: connect, close (or abort), original destination.

Nothing here knows the proxy machine; driver.py waits on these sockets with ``anyio.wait_readable`` and
``anyio.wait_writable``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct

import anyio

from tether.core.address import Address


async def connect(address: Address) -> socket.socket:
    """A connected non-blocking TCP socket to ``address`` (each resolved address tried in turn)."""
    infos = await anyio.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    last_error: OSError = OSError(errno.EHOSTUNREACH, f"no address for {address.host}")
    for family, kind, proto, _name, sockaddr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(sockaddr)
            if code == errno.EINPROGRESS:
                await anyio.wait_writable(sock)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code == 0:
                return sock
            last_error = OSError(code, os.strerror(code))
        except BaseException:
            anyio.notify_closing(sock)
            sock.close()
            raise
        sock.close()
    raise last_error


def close_socket(sock: socket.socket, *, reset: bool) -> None:
    """Close ``sock``, waking any task waiting on it; ``reset`` aborts with RST instead of a FIN."""
    if sock.fileno() < 0:
        return
    if reset:
        # SO_LINGER with a zero timeout makes close() send RST: the peer sees an abort, not a clean end.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    anyio.notify_closing(sock)  # tasks waiting on it wake with ClosedResourceError
    sock.close()


SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


def original_destination(sock: socket.socket) -> Address | None:
    """Where the client was going before iptables redirected it here, or None if it came here directly.

    Linux keeps the pre-NAT address of a REDIRECTed connection, readable with SO_ORIGINAL_DST (IPv4);
    the proxy routes by it as Linkerd's does. A connection that was not redirected reads back the
    proxy's own address, and so yields None.
    """
    if sock.family != socket.AF_INET:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port = struct.unpack("!H", raw[2:4])[0]
    address = Address(socket.inet_ntoa(raw[4:8]), port)
    local_host, local_port = sock.getsockname()[:2]
    return None if (address.host, address.port) == (local_host, local_port) else address
