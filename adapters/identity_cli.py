"""``tether identity``: create a mesh's CA, run the identity service, mint embedded tokens.

This module is the only place the identity commands draw entropy (keys, serial numbers, the token key)
and read the clock; the certificates themselves are built by core/identity/ca.py from those inputs.

Exit codes, as the rest of the CLI: 0 success; 2 bad usage or configuration (a missing or wrong file,
files that already exist); 3 the listen address cannot be bound.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tether.core.address import Address, AddressError
from tether.core.identity.ca import (
    ISSUER_VALIDITY_S_DEFAULT,
    LEAF_VALIDITY_S_DEFAULT,
    TRUST_ANCHOR_VALIDITY_S_DEFAULT,
    build_issuer,
    build_trust_anchor,
    utc_text,
)
from tether.core.identity.names import IdentityNameError, Mesh, WorkloadIdentity
from tether.core.identity.tokens import EMBEDDED_TOKEN_VALIDITY_S_DEFAULT, TokenKey, mint_token

if TYPE_CHECKING:
    from tether.adapters.identity_service import MeshFiles

EXIT_USAGE = 2
EXIT_BIND = 3
DAY_S = 86400
KEY_FILE_MODE = 0o600
CERTIFICATE_FILE_MODE = 0o644


def _fail(command: str, message: str, code: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"tether identity {command}: {message}", err=True)
    sys.exit(code)


@click.group()
def identity() -> None:
    """Workload identity: the mesh's certificate authority and the service that issues workload certificates.

    A proxy asks the identity service (`serve`) for a 24 h certificate naming its service account, proving
    who it is with a token: a Kubernetes service account token, or one minted by `token`.
    """


@identity.command()
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Directory to write the files to.")
@click.option("--trust-domain", default="cluster.local", show_default=True, help="The mesh's trust domain.")
@click.option("--control-plane-namespace", default="linkerd", show_default=True, help="Namespace of the control plane.")
@click.option(
    "--anchor-validity-days",
    type=click.IntRange(min=1, max=36500),
    default=TRUST_ANCHOR_VALIDITY_S_DEFAULT // DAY_S,
    show_default=True,
    help="Trust anchor lifetime: long, as replacing it means updating every proxy's trust bundle.",
)
@click.option(
    "--issuer-validity-days",
    type=click.IntRange(min=1, max=36500),
    default=ISSUER_VALIDITY_S_DEFAULT // DAY_S,
    show_default=True,
    help="Issuer lifetime: shorter, as replacing it only restarts the identity service (capped by the anchor's).",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as one JSON object.")
def init(
    out: str,
    trust_domain: str,
    control_plane_namespace: str,
    anchor_validity_days: int,
    issuer_validity_days: int,
    as_json: bool,
) -> None:
    """Create a new mesh: trust anchor (root) and issuer (intermediate), ECDSA P-256, plus a token key.

    Writes trust-anchor.crt, trust-anchor.key, issuer.crt, issuer.key and token.key into --out (keys with
    mode 0600) and never overwrites a file. Keep trust-anchor.key offline once the mesh runs: only a new
    issuer needs it.
    """
    from tether.adapters.identity_service import MeshFiles

    try:
        mesh = Mesh(control_plane_namespace=control_plane_namespace, trust_domain=trust_domain)
    except IdentityNameError as error:
        raise click.BadParameter(str(error)) from None
    files = MeshFiles(Path(out))
    existing = [str(path) for path in _init_paths(files) if path.exists()]
    if existing:
        _fail("init", f"{', '.join(existing)} already exist(s); choose an empty --out directory (nothing was written)")
    anchor, issuer = write_mesh(
        files,
        mesh,
        wall_time_s=time.time(),
        anchor_validity_s=anchor_validity_days * DAY_S,
        issuer_validity_s=issuer_validity_days * DAY_S,
    )
    report = {
        "dir": str(files.directory),
        "trust_domain": trust_domain,
        "control_plane_namespace": control_plane_namespace,
        "trust_anchor": {
            "subject": anchor.subject.rfc4514_string(),
            "not_after": utc_text(anchor.not_valid_after_utc.timestamp()),
        },
        "issuer": {
            "subject": issuer.subject.rfc4514_string(),
            "not_after": utc_text(issuer.not_valid_after_utc.timestamp()),
        },
        "files": {path.name: str(path) for path in _init_paths(files)},
    }
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"created a mesh for {mesh.issuer_name} in {files.directory}")
    click.echo(
        f"  trust anchor  {report['trust_anchor']['subject']}, valid until {report['trust_anchor']['not_after']}"
    )
    click.echo(f"  issuer        {report['issuer']['subject']}, valid until {report['issuer']['not_after']}")
    click.echo(f"next: tether identity serve --dir {files.directory}   (keep {files.trust_anchor_key.name} offline)")


def write_mesh(
    files: MeshFiles,
    mesh: Mesh,
    *,
    wall_time_s: float,
    anchor_validity_s: int = TRUST_ANCHOR_VALIDITY_S_DEFAULT,
    issuer_validity_s: int = ISSUER_VALIDITY_S_DEFAULT,
) -> tuple[x509.Certificate, x509.Certificate]:
    """Write a new mesh's five files (what ``init`` does; ``tether demo`` uses it in a temporary directory).

    Keys and serial numbers come from the OS's entropy; no file is overwritten (FileExistsError).
    Returns the trust anchor and the issuer certificates."""
    anchor_key, issuer_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    anchor = build_trust_anchor(
        anchor_key, mesh, wall_time_s=wall_time_s, serial=_serial(), validity_s=anchor_validity_s
    )
    issuer = build_issuer(
        issuer_key,
        mesh,
        anchor=anchor,
        anchor_key=anchor_key,
        wall_time_s=wall_time_s,
        serial=_serial(),
        validity_s=issuer_validity_s,
    )
    files.directory.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    _write(files.trust_anchor, anchor.public_bytes(pem), CERTIFICATE_FILE_MODE)
    _write(files.trust_anchor_key, _key_pem(anchor_key), KEY_FILE_MODE)
    _write(files.issuer_certificate, issuer.public_bytes(pem), CERTIFICATE_FILE_MODE)
    _write(files.issuer_key, _key_pem(issuer_key), KEY_FILE_MODE)
    _write(files.token_key, TokenKey(secrets.token_bytes(32)).to_text().encode(), KEY_FILE_MODE)
    return anchor, issuer


def _init_paths(files: MeshFiles) -> list[Path]:
    return [files.trust_anchor, files.trust_anchor_key, files.issuer_certificate, files.issuer_key, files.token_key]


def _serial() -> int:
    return secrets.randbits(127) + 1


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never replace a key that may already be in use, even if it appeared after the check above.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)


@identity.command()
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False), help="Mesh directory from `init`.")
@click.option("--listen", default="0.0.0.0:8080", show_default=True, metavar="HOST:PORT", help="gRPC address to serve.")
@click.option(
    "--tokens",
    type=click.Choice(["embedded", "kubernetes"]),
    default="embedded",
    show_default=True,
    help="embedded: tokens from `tether identity token`, checked offline with token.key; kubernetes: service "
    "account tokens checked with the TokenReview API (in-cluster config, else --kubeconfig).",
)
@click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None, help="With --tokens kubernetes.")
@click.option(
    "--leaf-validity-hours",
    type=click.IntRange(min=1, max=24 * 30),
    default=LEAF_VALIDITY_S_DEFAULT // 3600,
    show_default=True,
    help="Lifetime of workload certificates (never past the issuer's expiry).",
)
@click.option(
    "--workers", type=click.IntRange(min=1, max=64), default=8, show_default=True, help="Threads for TokenReview calls."
)
@click.option(
    "--processes",
    type=click.IntRange(min=1, max=64),
    default=1,
    show_default=True,
    help="Server processes sharing the port (SO_REUSEPORT); Certify is CPU-bound, so one per core to use.",
)
def serve(
    directory: str,
    listen: str,
    tokens: str,
    kubeconfig: str | None,
    leaf_validity_hours: int,
    workers: int,
    processes: int,
) -> None:
    """Serve io.linkerd.proxy.identity.Identity/Certify over gRPC (plaintext h2c) until SIGTERM or Ctrl-C.

    Prints one "listening on HOST:PORT" line on stdout once ready.
    """
    from tether.adapters.cli import event_loop_options
    from tether.adapters.identity_service import (
        IdentityService,
        MeshDirectoryError,
        MeshFiles,
        load_mesh,
        serve_processes,
    )
    from tether.core.identity.tokens import EmbeddedTokenVerifier

    try:
        address = Address.parse(listen, listening=True)
    except AddressError as error:
        raise click.BadParameter(str(error), param_hint="--listen") from None
    files = MeshFiles(Path(directory))
    try:
        loaded, token_key = load_mesh(files, time.time())
    except MeshDirectoryError as error:
        _fail("serve", str(error))
    if tokens == "kubernetes":
        verifier: Any = _kubernetes_verifier(kubeconfig)
    else:
        verifier = EmbeddedTokenVerifier(token_key)
    service = IdentityService(
        loaded.issuer,
        verifier,
        leaf_validity_s=leaf_validity_hours * 3600,
        verifier_blocks=tokens == "kubernetes",  # TokenReview waits on the API server; embedded tokens never wait
    )

    def ready(port: int) -> None:
        click.echo(
            f"tether identity: listening on {Address(address.host, port)} for {loaded.issuer.mesh.issuer_name} "
            f"(issuer valid until {utc_text(loaded.issuer.not_after_s)}, {tokens} tokens, {processes} process(es))"
        )
        sys.stdout.flush()

    try:
        serve_processes(
            service,
            address,
            processes=processes,
            workers=workers,
            on_ready=ready,
            use_uvloop=event_loop_options()["use_uvloop"],
        )
    except OSError as error:
        _fail("serve", error.strerror or str(error), EXIT_BIND)


def _kubernetes_verifier(kubeconfig: str | None) -> Any:
    import kubernetes.config

    from tether.adapters.identity_k8s import KubernetesTokenVerifier

    try:
        return KubernetesTokenVerifier.from_environment(kubeconfig)
    except (kubernetes.config.ConfigException, OSError) as error:
        _fail("serve", f"--tokens kubernetes: no cluster configuration ({error}); run in a pod or pass --kubeconfig")


@identity.command()
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False), help="Mesh directory from `init`.")
@click.option("--namespace", required=True, help="The workload's namespace.")
@click.option("--serviceaccount", required=True, help="The workload's service account.")
@click.option(
    "--valid-for-hours",
    type=click.IntRange(min=1, max=366 * 24),
    default=EMBEDDED_TOKEN_VALIDITY_S_DEFAULT // 3600,
    show_default=True,
    help="Token lifetime; mint a new one before it ends.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the token, identity and expiry as one JSON object.")
def token(directory: str, namespace: str, serviceaccount: str, valid_for_hours: int, as_json: bool) -> None:
    """Print an embedded token proving NAMESPACE/SERVICEACCOUNT to this mesh's identity service.

    For meshes without a cluster (`serve --tokens embedded`); the token is signed with DIR/token.key.
    """
    from tether.adapters.identity_service import MeshDirectoryError, MeshFiles, load_mesh, load_token_key

    files = MeshFiles(Path(directory))
    now_s = time.time()
    try:
        key = load_token_key(files)
        mesh = load_mesh(files, now_s)[0].issuer.mesh
        workload = WorkloadIdentity(namespace=namespace, serviceaccount=serviceaccount, mesh=mesh)
    except (MeshDirectoryError, IdentityNameError) as error:
        _fail("token", str(error))
    minted = mint_token(
        key, namespace=namespace, serviceaccount=serviceaccount, wall_time_s=now_s, valid_for_s=valid_for_hours * 3600
    )
    if as_json:
        expires = int(now_s) + valid_for_hours * 3600
        click.echo(json.dumps({"token": minted, "identity": workload.name, "expires_at": utc_text(expires)}))
    else:
        click.echo(minted)
