"""The proxy's identity settings, from ``--config FILE``, ``TETHER_PROXY_IDENTITY_*`` and ``--identity-*`` flags.

Linkerd's proxy takes the same four (``LINKERD2_PROXY_IDENTITY_LOCAL_NAME``, ``_SVC_ADDR``, ``_TRUST_ANCHORS``,
``_TOKEN_FILE``); here they are one group, each with a file field, a variable and a flag:

    identity:
      local_name: web.default.serviceaccount.identity.linkerd.cluster.local   # this proxy's identity
      svc_addr: 127.0.0.1:8080                 # the identity service (tether identity serve)
      trust_anchors: /var/run/tether/trust-anchor.crt   # PEM: the mesh's root(s)
      token_file: /var/run/secrets/tokens/tether-identity-token   # read before every Certify call

Later sources win field by field (file < environment < flags). Either none of the four is set (no identity:
no mTLS, ``/ready`` as soon as the proxy listens) or all of them are. Every error names where the value came
from (the file and field, the variable or the flag) and the fix. The trust anchors are read and checked once,
here; the token file is checked for readability here and read again before every call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tether.core.address import Address, AddressError
from tether.core.config_file import ConfigFileError
from tether.core.identity.names import IdentityNameError, check_dns_name

if TYPE_CHECKING:
    from cryptography import x509

FIELDS = ("local_name", "svc_addr", "trust_anchors", "token_file")
ENV_PREFIX = "TETHER_PROXY_IDENTITY_"
VARIABLES = {f"{ENV_PREFIX}{name.upper()}": name for name in FIELDS}
FLAGS = {name: "--identity-" + name.replace("_", "-") for name in FIELDS}
TRUST_ANCHORS_BYTES_MAX = 1 << 20
EXAMPLE_NAME = "web.default.serviceaccount.identity.linkerd.cluster.local"
_WHAT = {
    "local_name": f"this proxy's own identity, for example {EXAMPLE_NAME}",
    "svc_addr": "the identity service's HOST:PORT (tether identity serve listens on 0.0.0.0:8080)",
    "trust_anchors": "a PEM file with the mesh's trust anchors (trust-anchor.crt from tether identity init)",
    "token_file": "a file holding the token (tether identity token --dir DIR --namespace NS --serviceaccount SA)",
}


@dataclass(frozen=True, slots=True)
class IdentitySettings:
    local_name: str
    svc_addr: Address
    trust_anchors: Path
    trust_anchors_pem: bytes
    token_file: Path

    def describe(self) -> str:
        return f"identity {self.local_name} from {self.svc_addr} (trust anchors {self.trust_anchors})"


@dataclass(frozen=True, slots=True)
class _Value:
    text: str
    source: str  # the file's path, "environment" or "command line"
    field: str  # identity.token_file, TETHER_PROXY_IDENTITY_TOKEN_FILE or --identity-token-file

    def fail(self, problem: str, fix: str) -> ConfigFileError:
        return ConfigFileError(self.source, self.field, problem, fix)


def read_identity(
    file_node: object, file_source: str, env: Mapping[str, str], flags: Mapping[str, str | None]
) -> IdentitySettings | None:
    """The merged settings, or None when none of the four is set anywhere."""
    values = _collect(file_node, file_source, env, flags)
    if not values:
        return None
    first = next(iter(values.values()))
    for name in FIELDS:
        if name not in values:
            others = ", ".join(sorted(values))
            raise ConfigFileError(
                first.source,
                f"identity.{name}",
                f"is missing (the {others} setting(s) turn identity on, which needs all four)",
                f"set it to {_WHAT[name]} (variable {ENV_PREFIX}{name.upper()}, flag {FLAGS[name]}), or remove "
                f"the other identity settings",
            )
    anchors_path = Path(values["trust_anchors"].text)
    return IdentitySettings(
        local_name=_local_name(values["local_name"]),
        svc_addr=_address(values["svc_addr"]),
        trust_anchors=anchors_path,
        trust_anchors_pem=_trust_anchors(values["trust_anchors"], anchors_path),
        token_file=_token_file(values["token_file"]),
    )


def _collect(
    file_node: object, file_source: str, env: Mapping[str, str], flags: Mapping[str, str | None]
) -> dict[str, _Value]:
    values: dict[str, _Value] = {}
    if file_node is not None:
        if not isinstance(file_node, Mapping):
            raise ConfigFileError(file_source, "identity", "is not a mapping", f"write {', '.join(FIELDS)} under it")
        for key, value in file_node.items():
            if key not in FIELDS:
                fix = f"use one of: {', '.join(FIELDS)}"
                raise ConfigFileError(file_source, f"identity.{key}", "unknown field", fix)
            if not isinstance(value, str) or not value.strip():
                raise ConfigFileError(file_source, f"identity.{key}", f"{value!r} is not text", f"give {_WHAT[key]}")
            values[key] = _Value(value.strip(), file_source, f"identity.{key}")
    for variable, name in VARIABLES.items():
        if env.get(variable, "").strip():
            values[name] = _Value(env[variable].strip(), "environment", variable)
    for name, value in flags.items():
        if value is not None and value.strip():
            values[name] = _Value(value.strip(), "command line", FLAGS[name])
    return values


def _local_name(value: _Value) -> str:
    try:
        check_dns_name(value.text, "identity")
    except IdentityNameError as error:
        raise value.fail(str(error), f"give {_WHAT['local_name']} (lowercase)") from None
    return value.text


def _address(value: _Value) -> Address:
    try:
        return Address.parse(value.text)
    except AddressError as error:
        raise value.fail(str(error), f"give {_WHAT['svc_addr']}") from None


def _trust_anchors(value: _Value, path: Path) -> bytes:
    # Imported here, not at the top: a proxy without identity settings never loads ssl or cryptography.
    import ssl

    from cryptography import x509

    try:
        with path.open("rb") as handle:
            pem = handle.read(TRUST_ANCHORS_BYTES_MAX + 1)
    except OSError as error:
        problem = f"{path} cannot be read ({error.strerror or error})"
        raise value.fail(problem, f"give {_WHAT['trust_anchors']}") from None
    if len(pem) > TRUST_ANCHORS_BYTES_MAX:
        raise value.fail(f"{path} is larger than {TRUST_ANCHORS_BYTES_MAX} bytes", "give the trust anchors only")
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise value.fail(f"{path} holds no PEM certificate", f"give {_WHAT['trust_anchors']}") from None
    for certificate in certificates:
        if not _is_ca(certificate):
            subject = certificate.subject.rfc4514_string()
            raise value.fail(
                f"{path} holds {subject}, which is not a CA certificate",
                "give the mesh's trust anchors (roots), not a workload or issuer leaf",
            )
    try:
        ssl.create_default_context(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as error:
        raise value.fail(f"OpenSSL cannot load {path} ({error})", f"give {_WHAT['trust_anchors']}") from None
    return pem


def _is_ca(certificate: x509.Certificate) -> bool:
    from cryptography import x509

    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _token_file(value: _Value) -> Path:
    path = Path(value.text)
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as error:
        raise value.fail(f"{path} cannot be read ({error.strerror or error})", f"give {_WHAT['token_file']}") from None
    return path
