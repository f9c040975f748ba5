"""Certify throughput of `tether identity serve`: a bounded load from a few grpcio client channels.

    python bench/certify.py                      # 20,000 requests, 4 channels x 16 in flight
    python bench/certify.py --requests 5000 --channels 2 --in-flight 8 --json

It creates a mesh in a temporary directory (`tether identity init`), mints one embedded token, starts
`tether identity serve` on a free loopback port in a subprocess, pre-builds a pool of CSRs (so the client
spends its CPU on gRPC, not on key generation), warms up, then sends exactly --requests Certify calls and
stops (or stops earlier at --max-seconds). Every answer is checked to be a certificate. It prints
certificates per second, the server's CPU time per certificate (from /proc), and with --json one JSON line.

The server is `tether identity serve` as deployed: grpc.aio on uvloop (TETHER_EVENT_LOOP=asyncio in the
environment selects asyncio's loop), answering on its event loop since the embedded verifier never blocks.
The client and the server share this machine's cores, so the number is a floor for a server with a core
of its own. ``--client h2load`` sends the timed calls with h2load (nghttp2's C load generator, speaking
gRPC's framing over HTTP/2) instead of grpcio, so the client takes far less of the shared CPU: it posts one
pre-built CertifyRequest (one CSR; the service issues a new certificate for each call), and every answer is
checked by size, since h2load cannot decode them: the data it received must be at least ``requests`` times
the size of a certificate answer seen through grpcio during the warm-up (a refusal carries no data at all).
Only loopback is used.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from tether.core.identity.wire import CertifyRequest, decode_certify_response, encode_certify_request

TETHER = [sys.executable, "-m", "tether.adapters.cli"]
CERTIFY_METHOD = "/io.linkerd.proxy.identity.Identity/Certify"
NAMESPACE, SERVICEACCOUNT = "bench", "load"
IDENTITY = f"{SERVICEACCOUNT}.{NAMESPACE}.serviceaccount.identity.linkerd.cluster.local"
CSR_POOL_SIZE = 64
GRPC_FRAME_HEADER_BYTES = 5
ANSWER_SIZE_SLACK_BYTES = 4
WARMUP_REQUESTS = 500


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="Certify calls to time (default 20000).")
    parser.add_argument("--channels", type=int, default=4, help="Client channels (TCP connections), default 4.")
    parser.add_argument("--in-flight", type=int, default=16, help="Outstanding calls per channel, default 16.")
    parser.add_argument(
        "--workers", type=int, default=8, help="Server TokenReview threads (serve --workers); idle here."
    )
    parser.add_argument("--processes", type=int, default=1, help="Server processes (serve --processes), default 1.")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="Stop sending after this long.")
    parser.add_argument("--json", action="store_true", help="Print one JSON line with the results.")
    parser.add_argument(
        "--client", choices=["grpcio", "h2load"], default="grpcio", help="Load generator for the timed calls."
    )
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tether-certify-bench-") as temporary:
        mesh = Path(temporary) / "mesh"
        subprocess.run([*TETHER, "identity", "init", "--out", str(mesh)], check=True, capture_output=True)
        token = subprocess.run(
            [
                *TETHER,
                "identity",
                "token",
                "--dir",
                str(mesh),
                "--namespace",
                NAMESPACE,
                "--serviceaccount",
                SERVICEACCOUNT,
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        server, port = start_server(mesh, options.workers, options.processes)
        try:
            result = run_load(port, server.pid, token.encode(), options)
            result["server_cpu_s"] = round(result.pop("server_cpu_end_s") - result.pop("server_cpu_start_s"), 3)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=15)
    ok = result["ok"]
    result["server_cpu_us_per_cert"] = round(result["server_cpu_s"] / ok * 1e6, 1) if ok else None
    if options.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['certs_per_s']:.0f} certificates/s ({ok} ok, {result['failed']} failed in "
            f"{result['seconds']:.2f} s; {options.channels} channels x {options.in_flight} in flight, "
            f"{options.processes} server process(es))"
        )
        print(
            f"CPU per certificate: server {result['server_cpu_us_per_cert']} us, client "
            f"{result['client_cpu_us_per_call']} us; load average {result['load_average_1m']:.2f}"
        )
    return 0 if result["failed"] == 0 else 1


def start_server(mesh: Path, workers: int, processes: int) -> tuple[subprocess.Popen[str], int]:
    command = [*TETHER, "identity", "serve", "--dir", str(mesh), "--listen", "127.0.0.1:0"]
    command += ["--workers", str(workers), "--processes", str(processes)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on 127.0.0.1:" not in line:
        process.kill()
        raise SystemExit(f"tether identity serve did not start: {line!r}")
    return process, int(line.split("listening on 127.0.0.1:")[1].split()[0])


def csr_pool() -> list[bytes]:
    pool = []
    for _ in range(CSR_POOL_SIZE):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(IDENTITY)]), critical=False)
        pool.append(builder.sign(key, hashes.SHA256()).public_bytes(Encoding.DER))
    return pool


def process_cpu_s(pid: int) -> float:
    """utime + stime of the server and of the processes it forked (serve --processes)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for member in [pid, *map(int, children)]:
        fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_load(port: int, server_pid: int, token: bytes, options: argparse.Namespace) -> dict:
    requests = [
        encode_certify_request(CertifyRequest(identity=IDENTITY, token=token, certificate_signing_request=csr))
        for csr in csr_pool()
    ]
    channels = [
        grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(options.channels)
    ]
    calls = [
        channel.unary_unary(CERTIFY_METHOD, request_serializer=None, response_deserializer=decode_certify_response)
        for channel in channels
    ]
    drive(calls, requests, WARMUP_REQUESTS, options.in_flight, deadline=time.monotonic() + 60)
    # The size of one certificate answer to the request h2load will post, taken through grpcio (decoded).
    reference_bytes = reference_answer_bytes(channels[0], requests[0])
    cpu_start = process_cpu_s(server_pid)
    client_start = own_cpu_s()
    started = time.monotonic()
    if options.client == "h2load":
        ok, failed, client_cpu_s = drive_h2load(port, requests[0], reference_bytes, options)
    else:
        ok, failed = drive(calls, requests, options.requests, options.in_flight, deadline=started + options.max_seconds)
        client_cpu_s = own_cpu_s() - client_start
    seconds = time.monotonic() - started
    cpu_end = process_cpu_s(server_pid)
    for channel in channels:
        channel.close()
    return {
        "requests": ok + failed,
        "ok": ok,
        "failed": failed,
        "seconds": round(seconds, 3),
        "certs_per_s": round(ok / seconds, 1),
        "channels": options.channels,
        "in_flight": options.in_flight,
        "workers": options.workers,
        "processes": options.processes,
        "client_cpu_us_per_call": round(client_cpu_s / max(ok + failed, 1) * 1e6, 1),
        "load_average_1m": os.getloadavg()[0],
        "server_cpu_start_s": cpu_start,
        "server_cpu_end_s": cpu_end,
    }


def reference_answer_bytes(channel: grpc.Channel, request: bytes) -> int:
    """The length of a gRPC-framed CertifyResponse for ``request``, checked to carry a leaf certificate."""
    raw = channel.unary_unary(CERTIFY_METHOD, request_serializer=None, response_deserializer=None)(request, timeout=30)
    assert decode_certify_response(raw).leaf_certificate, "the reference answer carries no certificate"
    return len(raw) + GRPC_FRAME_HEADER_BYTES


def drive_h2load(
    port: int, request: bytes, reference_bytes: int, options: argparse.Namespace
) -> tuple[int, int, float]:
    """``options.requests`` calls from h2load (``--channels`` connections x ``--in-flight`` streams): (ok, failed,
    client CPU seconds). Answers are counted as certificates only if the data received adds up (module doc)."""
    with tempfile.NamedTemporaryFile(prefix="certify-", suffix=".bin") as body:
        body.write(b"\x00" + len(request).to_bytes(4, "big") + request)  # gRPC frame: uncompressed, length
        body.flush()
        command = ["h2load", "-n", str(options.requests), "-c", str(options.channels), "-m", str(options.in_flight)]
        command += ["-d", body.name, "-H", "content-type: application/grpc", "-H", "te: trailers"]
        command += [f"http://127.0.0.1:{port}{CERTIFY_METHOD}"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        output = subprocess.run(command, capture_output=True, text=True, timeout=options.max_seconds + 30).stdout
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    succeeded = int(_h2load_field(output, r"(\d+) succeeded"))
    data_bytes = int(_h2load_field(output, r"headers \(space savings [^)]*\), [\d.]+\w*B \((\d+)\) data"))
    # Signatures vary by a byte or two (DER integers), so allow a few bytes per answer below the reference.
    certificates = min(succeeded, data_bytes // (reference_bytes - ANSWER_SIZE_SLACK_BYTES))
    client_cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return certificates, options.requests - certificates, client_cpu_s


def _h2load_field(output: str, pattern: str, group: int = 1) -> str:
    found = re.search(pattern, output)
    if found is None:
        raise SystemExit(f"h2load's output has no match for {pattern!r}:\n{output}")
    return found.group(group)


def drive(calls: list, requests: list[bytes], total: int, in_flight: int, *, deadline: float) -> tuple[int, int]:
    """Send ``total`` calls spread over the channels, each keeping ``in_flight`` outstanding; one thread each."""
    counts = collections.Counter()
    lock = threading.Lock()
    shares = [total // len(calls) + (1 if index < total % len(calls) else 0) for index in range(len(calls))]

    def one_channel(call: grpc.UnaryUnaryMultiCallable, share: int) -> None:
        pending: collections.deque = collections.deque()
        sent = ok = failed = 0
        while (sent < share and time.monotonic() < deadline) or pending:
            while sent < share and len(pending) < in_flight and time.monotonic() < deadline:
                pending.append(call.future(requests[sent % len(requests)], timeout=30))
                sent += 1
            try:
                response = pending.popleft().result()
                ok += bool(response.leaf_certificate)
                failed += not response.leaf_certificate
            except grpc.RpcError:
                failed += 1
        with lock:
            counts["ok"] += ok
            counts["failed"] += failed

    threads = [
        threading.Thread(target=one_channel, args=(call, share)) for call, share in zip(calls, shares, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts["ok"], counts["failed"]


if __name__ == "__main__":
    sys.exit(main())
