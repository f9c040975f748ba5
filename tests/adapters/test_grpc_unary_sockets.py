"""The core's unary gRPC client against a real grpcio server over loopback.

The test itself is the driver: a plain blocking socket, the machine's bytes written as they come, and an
explicit (virtual) ``now_ns``, so a deadline is tested by handing the machine a later time, not by waiting.
The server is grpcio with a generic handler on raw bytes; it plays the identity service's method name.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from tether.core.identity.grpc_unary import (
    GrpcStatus,
    GrpcUnaryClient,
    GrpcUnaryUsageError,
    UnaryResult,
    decode_grpc_message,
    encode_grpc_timeout,
)

pytestmark = pytest.mark.realsocket

S = 1_000_000_000
CERTIFY = "/io.linkerd.proxy.identity.Identity/Certify"
HANG_GUARD_S = 10  # a broken test fails after this instead of hanging; no assertion depends on it


@dataclass
class Service:
    """Certify as raw bytes: echoes reversed, or fails, hangs or answers big when the request says so."""

    remaining_s: list[float] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def certify(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.remaining_s.append(context.time_remaining())
        self.metadata.append({key: value for key, value in context.invocation_metadata()})
        if request.startswith(b"fail:"):
            context.abort(grpc.StatusCode.PERMISSION_DENIED, request[5:].decode())
        if request == b"hang":
            context.add_callback(self.cancelled.set)
            self.started.set()
            self.release.wait(HANG_GUARD_S)
            return b""
        if request.startswith(b"big:"):
            return b"z" * int(request[4:])
        return request[::-1]


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, Service]]:
    service = Service()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "io.linkerd.proxy.identity.Identity", {"Certify": grpc.unary_unary_rpc_method_handler(service.certify)}
    )
    grpc_server.add_generic_rpc_handlers((handler,))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield port, service
    service.release.set()
    grpc_server.stop(grace=None)


class Driver:
    """A blocking-socket driver for one GrpcUnaryClient."""

    def __init__(self, port: int, **options: int) -> None:
        self.socket = socket.create_connection(("127.0.0.1", port))
        self.socket.settimeout(HANG_GUARD_S)
        self.client = GrpcUnaryClient(authority=f"127.0.0.1:{port}", **options)
        self.flush()

    def flush(self) -> None:
        data = self.client.data_to_send()
        if data:
            self.socket.sendall(data)

    def start(self, request: bytes, *, timeout_ns: int = 60 * S, path: str = CERTIFY, **options) -> int:
        call_id = self.client.start_call(path, request, 0, timeout_ns, **options)
        self.flush()
        return call_id

    def results(self, count: int = 1) -> list[UnaryResult]:
        results: list[UnaryResult] = []
        while len(results) < count:
            data = self.socket.recv(65_536)
            results += self.client.receive(data, 0)
            self.flush()
            if not data:
                break
        return results

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def driver(server) -> Iterator[Driver]:
    port, _service = server
    driver = Driver(port)
    yield driver
    driver.close()


def test_GrpcUnaryClient_calls_grpcio_and_gets_the_response(driver: Driver, server):
    _port, service = server
    call_id = driver.start(b"csr and token", metadata=(("l5d-test", "yes"),))
    assert driver.results() == [
        UnaryResult(call_id=call_id, status=GrpcStatus.OK, message="", response=b"nekot dna rsc")
    ]
    # grpc-timeout reached the server as a deadline (60 s, less what has passed), and so did the metadata.
    assert 0 < service.remaining_s[-1] <= 60
    assert service.metadata[-1]["l5d-test"] == "yes"


def test_GrpcUnaryClient_reads_status_and_message_from_trailers(driver: Driver):
    call_id = driver.start("fail:token rejected: 100 % wrong, ünïcode".encode())
    [result] = driver.results()
    assert result == UnaryResult(
        call_id=call_id, status=GrpcStatus.PERMISSION_DENIED, message="token rejected: 100 % wrong, ünïcode"
    )


def test_GrpcUnaryClient_reads_a_trailers_only_answer(driver: Driver):
    call_id = driver.start(b"x", path="/io.linkerd.proxy.identity.Identity/Nope")
    [result] = driver.results()
    assert (result.call_id, result.status, result.response) == (call_id, GrpcStatus.UNIMPLEMENTED, None)


def test_GrpcUnaryClient_carries_calls_side_by_side_and_a_response_larger_than_a_window(driver: Driver):
    big = driver.start(b"big:300000")  # beyond the 64 KiB stream window: the client must keep reopening it
    small = driver.start(b"abc")
    results = {result.call_id: result for result in driver.results(2)}
    assert results[big].status == GrpcStatus.OK and results[big].response == b"z" * 300_000
    assert results[small].response == b"cba"


def test_GrpcUnaryClient_refuses_a_response_over_its_limit(server):
    port, _service = server
    driver = Driver(port, max_response_bytes=1000)
    try:
        call_id = driver.start(b"big:5000")
        assert driver.results() == [
            UnaryResult(
                call_id=call_id,
                status=GrpcStatus.RESOURCE_EXHAUSTED,
                message="the response is larger than 1000 bytes",
            )
        ]
        assert driver.client.open_calls == 0 and driver.client.usable
        assert driver.start(b"ok") and driver.results()[0].response == b"ko"  # the connection still works
    finally:
        driver.close()


def test_GrpcUnaryClient_deadline_fails_the_call_and_cancels_it_on_the_server(driver: Driver, server):
    _port, service = server
    service.started.clear()
    service.cancelled.clear()
    call_id = driver.start(b"hang", timeout_ns=60 * S)
    assert service.started.wait(HANG_GUARD_S)  # the handler runs: a cancellation now reaches it
    assert driver.client.next_deadline_ns() == 60 * S
    assert driver.client.on_timer(59 * S) == []
    [result] = driver.client.on_timer(60 * S)  # virtual time: nobody waits a minute
    assert (result.call_id, result.status) == (call_id, GrpcStatus.DEADLINE_EXCEEDED)
    driver.flush()  # RST_STREAM(CANCEL)
    assert service.cancelled.wait(HANG_GUARD_S), "the server never saw the cancellation"
    assert driver.client.next_deadline_ns() is None


def test_GrpcUnaryClient_fails_open_calls_when_the_server_closes():
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        driver = Driver(listener.getsockname()[1])
        accepted, _address = listener.accept()
        call_id = driver.start(b"never answered")
        accepted.shutdown(socket.SHUT_WR)  # a server that goes away mid-call

        assert driver.results() == [
            UnaryResult(call_id=call_id, status=GrpcStatus.UNAVAILABLE, message="the server closed the connection")
        ]
        assert not driver.client.usable
        with pytest.raises(GrpcUnaryUsageError):
            driver.start(b"again")
        driver.close()
        accepted.close()


@pytest.mark.parametrize(
    ("timeout_ns", "encoded"),
    [
        (1, "1n"),
        (99_999_999, "99999999n"),
        (100_000_000, "100000u"),
        (60 * S, "60000000u"),
        (100 * S, "100000m"),
        (10**8 * S, "1666667M"),
    ],
)
def test_encode_grpc_timeout_uses_at_most_8_digits_rounding_up(timeout_ns, encoded):
    assert encode_grpc_timeout(timeout_ns) == encoded


def test_decode_grpc_message_keeps_malformed_escapes():
    assert decode_grpc_message(b"a%20b%zz%4") == "a b%zz%4"
