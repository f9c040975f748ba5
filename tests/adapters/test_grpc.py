"""gRPC through a meshed pair of real `tether proxy` roles: grpcio client -> outbound -> HTTP/2 with a
transport header -> inbound -> grpcio server. Neither grpcio side was written here."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from net_helpers import free_port

MB = 1024 * 1024
MESSAGE_LIMIT = [("grpc.max_receive_message_length", 32 * MB), ("grpc.max_send_message_length", 32 * MB)]
pytestmark = pytest.mark.realsocket


class EchoService:
    """The server side: echoes, streams, fails on request, and records cancellations."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        if request == b"fail":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "told to fail")
        if request == b"slow":
            context.add_callback(self.cancelled.set)
            time.sleep(3)
        return request

    def server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for index in range(int(request)):
            yield b"%d" % index

    def client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"".join(requests)

    def bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        context.add_callback(self.cancelled.set)
        for request in requests:
            yield request[::-1]

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "test.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            },
        )


@dataclass
class Mesh:
    channel: grpc.Channel
    service: EchoService
    admin_port: int
    outbound_port: int


MESH_CONF = """
admin: 127.0.0.1:{admin}
outbound:
  listen: 127.0.0.1:{outbound}
  routes: {{"echo.test": ["127.0.0.1:{server}"], "closed.test": ["127.0.0.1:{closed}"]}}
  meshed: {{"echo.test": {inbound}, "closed.test": {inbound}}}
inbound:
  listen: 127.0.0.1:{inbound}
  to: 127.0.0.1:{server}
"""


@pytest.fixture
def mesh(tether_config) -> Iterator[Mesh]:
    service = EchoService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=MESSAGE_LIMIT)
    server.add_generic_rpc_handlers((service.handler(),))
    server_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    admin, outbound, inbound = free_port(), free_port(), free_port()
    ports = {"admin": admin, "outbound": outbound, "inbound": inbound, "server": server_port, "closed": free_port()}
    tether_config(MESH_CONF.format(**ports), outbound, admin)
    options = [("grpc.default_authority", "echo.test"), *MESSAGE_LIMIT]
    channel = grpc.insecure_channel(f"127.0.0.1:{outbound}", options=options)
    try:
        yield Mesh(channel, service, admin, outbound)
    finally:
        channel.close()
        server.stop(grace=None)


def test_unary_call(mesh: Mesh) -> None:
    call = mesh.channel.unary_unary("/test.Echo/Unary")
    assert call(b"hello", timeout=10) == b"hello"


def test_ten_megabyte_messages_both_ways(mesh: Mesh) -> None:
    payload = os.urandom(10 * MB)
    call = mesh.channel.unary_unary("/test.Echo/Unary")
    assert call(payload, timeout=60) == payload


def test_server_streaming(mesh: Mesh) -> None:
    call = mesh.channel.unary_stream("/test.Echo/ServerStream")
    assert list(call(b"200", timeout=10)) == [b"%d" % i for i in range(200)]


def test_client_streaming(mesh: Mesh) -> None:
    call = mesh.channel.stream_unary("/test.Echo/ClientStream")
    parts = [os.urandom(1000) for _ in range(300)]
    assert call(iter(parts), timeout=10) == b"".join(parts)


def test_bidi_streaming(mesh: Mesh) -> None:
    call = mesh.channel.stream_stream("/test.Echo/Bidi")
    parts = [b"abc%d" % i for i in range(100)]
    assert list(call(iter(parts), timeout=10)) == [part[::-1] for part in parts]


def test_error_status_and_message_pass_through(mesh: Mesh) -> None:
    call = mesh.channel.unary_unary("/test.Echo/Unary")
    with pytest.raises(grpc.RpcError) as raised:
        call(b"fail", timeout=10)
    assert raised.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert raised.value.details() == "told to fail"


def test_deadline_exceeded_cancels_the_server_call(mesh: Mesh) -> None:
    call = mesh.channel.unary_unary("/test.Echo/Unary")
    with pytest.raises(grpc.RpcError) as raised:
        call(b"slow", timeout=0.5)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # The client's RST_STREAM crossed both proxies: the server learns the call is over.
    assert mesh.service.cancelled.wait(5)


def test_client_cancellation_reaches_the_server(mesh: Mesh) -> None:
    call = mesh.channel.stream_stream("/test.Echo/Bidi")
    gate = threading.Event()

    def requests() -> Iterator[bytes]:
        yield b"first"
        gate.wait(10)

    responses = call(requests(), timeout=20)
    assert next(responses) == b"tsrif"
    responses.cancel()
    gate.set()
    assert mesh.service.cancelled.wait(5)


def test_proxy_errors_are_grpc_statuses(mesh: Mesh, tmp_path: Path) -> None:
    """Nothing listens behind closed.test: the proxy answers UNAVAILABLE with its reason."""
    options = [("grpc.default_authority", "closed.test")]
    with (
        grpc.insecure_channel(f"127.0.0.1:{mesh.outbound_port}", options=options) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        channel.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
    assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "proxy error" in raised.value.details()


def test_grpc_metrics_carry_grpc_status(mesh: Mesh) -> None:
    call = mesh.channel.unary_unary("/test.Echo/Unary")
    call(b"ok", timeout=10)
    with pytest.raises(grpc.RpcError):
        call(b"fail", timeout=10)
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.admin_port}/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'classification="success",status_code="200",grpc_status="0"' in metrics
    assert 'classification="failure",status_code="200",grpc_status="9"' in metrics
