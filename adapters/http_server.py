"""A small HTTP/1.1 server (h11 over anyio) for the admin endpoints and the demo's applications.

A handler gets the request head and its body (at most ``MAX_REQUEST_BODY`` bytes; a larger one is
answered 413) and returns the status, the body and its content type.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
import h11

Handler = Callable[[h11.Request, bytes], Awaitable[tuple[int, bytes, str]]]
MAX_REQUEST_BODY = 1024 * 1024


async def serve_http(listener: anyio.abc.SocketListener, handler: Handler) -> None:
    """Serve ``handler`` on every connection of ``listener`` until cancelled."""
    await listener.serve(lambda stream: _connection(stream, handler))


async def _connection(stream: anyio.abc.SocketStream, handler: Handler) -> None:
    parser = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            request, body, problem = await _read_request(stream, parser)
            if request is None and problem is None:
                return
            if problem is not None:
                status, payload, content_type = problem, b"bad request\n", "text/plain"
            else:
                assert request is not None
                status, payload, content_type = await handler(request, body)
            headers = [("content-type", content_type), ("content-length", str(len(payload)))]
            if problem is not None:
                headers.append(("connection", "close"))
            try:
                await stream.send(
                    parser.send(h11.Response(status_code=status, headers=headers))
                    + parser.send(h11.Data(data=payload))
                    + parser.send(h11.EndOfMessage())
                )
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, h11.LocalProtocolError):
                return
            if parser.our_state is not h11.DONE or parser.their_state is not h11.DONE:
                return
            parser.start_next_cycle()


async def _read_request(
    stream: anyio.abc.SocketStream, parser: h11.Connection
) -> tuple[h11.Request | None, bytes, int | None]:
    """The next request and its body; or (None, b"", status) for a bad one; or (None, b"", None) at EOF."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as error:
            return None, b"", error.error_status_hint
        if event is h11.NEED_DATA:
            try:
                parser.receive_data(await stream.receive(65536))
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                parser.receive_data(b"")
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_REQUEST_BODY:
                return None, b"", 413
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body), None
        else:
            return None, b"", None
