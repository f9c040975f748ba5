"""The identity service on grpcio: ``io.linkerd.proxy.identity.Identity/Certify`` around the core CA.

The adapter reads the mesh directory, the clock and the OS's entropy (serial numbers); the core decides
everything else. One Certify call: decode (core/identity/wire.py) -> check the identity and CSR -> verify
the token (the only step that may block: TokenReview is a network call) -> certify -> encode. Requests go
through grpcio's generic handler with raw bytes, so a malformed message reaches our decoder and comes back
as INVALID_ARGUMENT with a reason, rather than as grpcio's opaque deserializer failure.

`tether identity serve` runs grpc.aio, one event loop per process, and answers Certify on the loop itself
when the token verifier is pure (the embedded one): Certify is CPU-bound, and grpcio's threaded server
spent about 150 us of every call passing the GIL between its polling thread and the handler threads
(bench/certify.py, under shared load). A verifier that blocks (Kubernetes TokenReview)
runs the call in a thread pool of ``workers`` instead, so a slow API server stalls no other caller. The
threaded server (``start_server``) stays for callers that embed the service in a threaded program (the
demo, tests).

Error kinds map to gRPC status codes:

    invalid_request   -> INVALID_ARGUMENT     (fix the request: identity, CSR, message)
    invalid_token     -> UNAUTHENTICATED      (the token proves nothing)
    identity_mismatch -> FAILED_PRECONDITION  (the token proves another identity)
    not_ready         -> UNAVAILABLE          (issuer not valid now, or TokenReview failed: retry)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from tether.core.address import Address
from tether.core.identity.ca import LEAF_VALIDITY_S_DEFAULT, Issuer
from tether.core.identity.errors import CertifyError
from tether.core.identity.issuer_config import CaConfigError, CaConfigItem, LoadedCa, load_ca
from tether.core.identity.service import CERTIFY_STATUS, answer_certify
from tether.core.identity.tokens import TokenKey, TokenVerifier

log = logging.getLogger("tether.identity")

SERVICE_NAME = "io.linkerd.proxy.identity.Identity"
CERTIFY_METHOD = f"/{SERVICE_NAME}/Certify"
# grpc.StatusCode by number, for the status service.CERTIFY_STATUS gives each refusal.
STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
# Certify is CPU-bound under the GIL, so more threads add no throughput; they only absorb TokenReview
# round trips. 8 keeps a slow API server from stalling every caller.
WORKERS_DEFAULT = 8
REQUEST_BYTES_MAX = 64 * 1024  # a request is a name, a ~1 KB token and a ~300-byte CSR
SERIAL_BITS = 127
STOP_GRACE_S = 5.0


@dataclass(frozen=True, slots=True)
class MeshFiles:
    """The files ``tether identity init`` writes and ``tether identity serve`` reads, by role."""

    directory: Path

    @property
    def trust_anchor(self) -> Path:
        return self.directory / "trust-anchor.crt"

    @property
    def trust_anchor_key(self) -> Path:
        """Only ``init`` uses it; keep it offline once the mesh runs (the service never reads it)."""
        return self.directory / "trust-anchor.key"

    @property
    def issuer_certificate(self) -> Path:
        return self.directory / "issuer.crt"

    @property
    def issuer_key(self) -> Path:
        return self.directory / "issuer.key"

    @property
    def token_key(self) -> Path:
        return self.directory / "token.key"

    def path_of(self, item: CaConfigItem) -> Path:
        return {
            CaConfigItem.TRUST_ANCHOR: self.trust_anchor,
            CaConfigItem.ISSUER_CERTIFICATE: self.issuer_certificate,
            CaConfigItem.ISSUER_KEY: self.issuer_key,
            CaConfigItem.TOKEN_KEY: self.token_key,
        }[item]


class MeshDirectoryError(Exception):
    """A mesh directory the service cannot start from; the message names the file, the problem and the fix."""


def load_mesh(files: MeshFiles, wall_time_s: float) -> tuple[LoadedCa, TokenKey]:
    """Read and check every file the service needs; MeshDirectoryError naming the first bad one."""
    contents = {item: _read(files, item) for item in CaConfigItem}
    try:
        loaded = load_ca(
            trust_anchor_pem=contents[CaConfigItem.TRUST_ANCHOR],
            issuer_certificate_pem=contents[CaConfigItem.ISSUER_CERTIFICATE],
            issuer_key_pem=contents[CaConfigItem.ISSUER_KEY],
            wall_time_s=wall_time_s,
        )
    except CaConfigError as error:
        raise MeshDirectoryError(f"{files.path_of(error.item)} ({error.item.value}): {error.message}") from None
    try:
        token_key = TokenKey.from_text(contents[CaConfigItem.TOKEN_KEY].decode("ascii", "replace"))
    except ValueError as error:
        raise MeshDirectoryError(f"{files.token_key} (token key): {error}") from None
    return loaded, token_key


def load_token_key(files: MeshFiles) -> TokenKey:
    try:
        return TokenKey.from_text(_read(files, CaConfigItem.TOKEN_KEY).decode("ascii", "replace"))
    except ValueError as error:
        raise MeshDirectoryError(f"{files.token_key} (token key): {error}") from None


def _read(files: MeshFiles, item: CaConfigItem) -> bytes:
    path = files.path_of(item)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MeshDirectoryError(
            f"{path} ({item.value}) is missing; create a mesh directory with `tether identity init --out "
            f"{files.directory}`, or point --dir at one"
        ) from None
    except OSError as error:
        raise MeshDirectoryError(f"{path} ({item.value}) cannot be read: {error.strerror or error}") from None


def draw_serial() -> int:
    """A serial number from the OS's entropy: 127 random bits, never zero (RFC 5280 wants positive)."""
    return secrets.randbits(SERIAL_BITS) + 1


class IdentityService:
    """One issuer and one token verifier behind the Certify method."""

    def __init__(
        self,
        issuer: Issuer,
        verifier: TokenVerifier,
        *,
        wall_clock: Callable[[], float] = time.time,
        serials: Callable[[], int] = draw_serial,
        leaf_validity_s: int = LEAF_VALIDITY_S_DEFAULT,
        verifier_blocks: bool = True,
    ) -> None:
        """``verifier_blocks``: False only for a verifier that never waits on I/O (EmbeddedTokenVerifier), so
        that grpc.aio may answer on its event loop (module docstring)."""
        self._verifier_blocks = verifier_blocks
        self._issuer = issuer
        self._verifier = verifier
        self._wall_clock = wall_clock
        self._serials = serials
        self._leaf_validity_s = leaf_validity_s

    def certify(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            return self._certify(request)
        except CertifyError as error:
            log.info("Certify refused (%s): %s", error.problem.label, error.message)
            context.abort(STATUS_CODES[CERTIFY_STATUS[error.kind]], error.message)
            raise AssertionError("context.abort raises") from None

    async def certify_async(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            if self._verifier_blocks:
                return await asyncio.get_running_loop().run_in_executor(None, self._certify, request)
            return self._certify(request)
        except CertifyError as error:
            log.info("Certify refused (%s): %s", error.problem.label, error.message)
            await context.abort(STATUS_CODES[CERTIFY_STATUS[error.kind]], error.message)
            raise AssertionError("context.abort raises") from None

    def _certify(self, request: bytes) -> bytes:
        _issued, response = answer_certify(
            request,
            issuer=self._issuer,
            verifier=self._verifier,
            wall_time_s=self._wall_clock(),
            serial=self._serials,
            leaf_validity_s=self._leaf_validity_s,
        )
        return response

    def handler(self) -> grpc.GenericRpcHandler:
        # No (de)serializers: the method sees the raw bytes and decodes them itself (see the module docstring).
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME, {"Certify": grpc.unary_unary_rpc_method_handler(self.certify)}
        )

    def async_handler(self) -> grpc.GenericRpcHandler:
        """The same method for a grpc.aio server."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME, {"Certify": grpc.unary_unary_rpc_method_handler(self.certify_async)}
        )


def start_server(
    service: IdentityService, listen: Address, *, workers: int = WORKERS_DEFAULT, reuse_port: bool = False
) -> tuple[grpc.Server, int]:
    """Bind ``listen`` (port 0: any free port) and start serving; returns the server and the bound port.

    ``reuse_port`` lets several processes share the port (see ``serve_processes``). Raises OSError when the
    address cannot be bound.
    """
    assert workers > 0, workers
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="identity"),
        handlers=[service.handler()],
        options=_server_options(reuse_port),
    )
    port = _bind(server, listen)
    server.start()
    return server, port


async def serve_async(
    service: IdentityService, listen: Address, *, workers: int, reuse_port: bool, on_ready: Callable[[int], None]
) -> None:
    """Serve on a grpc.aio server in the running loop until SIGTERM or SIGINT (see ``serve_async_until``)."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await serve_async_until(stopping, service, listen, workers=workers, reuse_port=reuse_port, on_ready=on_ready)


async def serve_async_until(
    stopping: asyncio.Event,
    service: IdentityService,
    listen: Address,
    *,
    workers: int,
    reuse_port: bool,
    on_ready: Callable[[int], None],
) -> None:
    """Serve on a grpc.aio server in the running loop until ``stopping`` is set, then stop, letting calls in
    flight finish for up to 5 s. ``on_ready(port)`` runs once it listens. Raises OSError when the address
    cannot be bound."""
    assert workers > 0, workers
    executor = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="identity")
    asyncio.get_running_loop().set_default_executor(executor)  # for a verifier that blocks
    server = grpc.aio.server(handlers=[service.async_handler()], options=_server_options(reuse_port))
    port = _bind(server, listen)
    await server.start()
    on_ready(port)
    await stopping.wait()
    log.info("stopping (calls in flight get %.0f s)", STOP_GRACE_S)
    await server.stop(STOP_GRACE_S)


def _server_options(reuse_port: bool) -> list[tuple[str, int]]:
    return [("grpc.max_receive_message_length", REQUEST_BYTES_MAX), ("grpc.so_reuseport", int(reuse_port))]


def _bind(server: grpc.Server | grpc.aio.Server, listen: Address) -> int:
    try:
        port = server.add_insecure_port(str(listen))
    except RuntimeError as error:  # grpcio >= 1.51 raises instead of returning 0
        raise OSError(f"cannot listen on {listen}: {error}") from None
    if port == 0:
        raise OSError(f"cannot listen on {listen}: the address is in use or not local")
    return port


def serve_processes(
    service: IdentityService,
    listen: Address,
    *,
    processes: int,
    workers: int,
    on_ready: Callable[[int], None],
    use_uvloop: bool = False,
) -> None:
    """Serve from ``processes`` processes sharing one port (SO_REUSEPORT), until SIGTERM or Ctrl-C.

    Certify is CPU-bound and Python runs one thread at a time, so a second core needs a second process;
    the kernel spreads new connections over the listeners (each proxy holds one connection). The children
    are forked before any gRPC object exists, as grpcio requires; each runs its own grpc.aio loop
    (``serve_async``), on uvloop when ``use_uvloop`` (the CLI's choice: adapters/cli.py event_loop_options).
    ``on_ready(port)`` runs once this process listens. Raises OSError when the address
    cannot be bound.
    """
    assert processes >= 1, processes
    reservation, port = _reserve_port(listen) if processes > 1 else (None, listen.port)
    address = Address(listen.host, port)
    children = []
    for _ in range(processes - 1):
        pid = os.fork()
        if pid == 0:  # the child serves until its parent forwards SIGTERM
            try:
                serving = serve_async(service, address, workers=workers, reuse_port=True, on_ready=lambda _: None)
                _run(serving, use_uvloop)
            finally:
                os._exit(0)
        children.append(pid)

    def ready(bound: int) -> None:
        if reservation is not None:
            reservation.close()
        on_ready(bound)

    try:
        _run(serve_async(service, address, workers=workers, reuse_port=processes > 1, on_ready=ready), use_uvloop)
    finally:
        if reservation is not None:
            reservation.close()  # again, harmlessly, unless binding failed before ``ready``
        _stop_children(children)


def _run(serving: Coroutine[None, None, None], use_uvloop: bool) -> None:
    # uvloop cut the server's CPU per certificate by about a tenth in bench/certify.py.
    factory = None
    if use_uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serving)


def _reserve_port(listen: Address) -> tuple[socket.socket, int]:
    # Port 0 must become one concrete port before forking, so every process binds the same one. The
    # reservation is bound (not listening) with SO_REUSEPORT until the listeners exist.
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    reservation = socket.socket(family, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reservation.bind((listen.host, listen.port))
    except OSError as error:
        reservation.close()
        raise OSError(error.errno, f"cannot listen on {listen}: {error.strerror or error}") from None
    return reservation, int(reservation.getsockname()[1])


def _stop_children(children: list[int]) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in children:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
